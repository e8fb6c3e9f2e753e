"""Process memory readings for the trainer and the benchmarks: the one implementation
lives in the bottom layer (``data_tools.sysinfo``), which the data tools use too."""
from data_tools.sysinfo import peak_rss_bytes, reset_peak_rss  # noqa: F401
