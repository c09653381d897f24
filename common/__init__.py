"""What every llmos process shares that is not the wire: LLMOS_HOME's layout,
private key files, config files, capability tokens, logging.

Layering (checked by tests/unit/test_layering.py): ipc <- common <- sdk <-
{kernel, drivers, services} <- tools; text <- common, used by drivers and
services."""
