"""The DDP script is run by a test in its own processes; it is not a test module."""

collect_ignore = ["_lightning_ddp_script.py"]
