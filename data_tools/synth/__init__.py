"""Synthetic long-context data: CIP, SynL and needle/passkey (``python -m data_tools.synth``)."""
