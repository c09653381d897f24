"""A child that ignores SIGTERM and never registers (`llmos down` timeout tests)."""

import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(60)
