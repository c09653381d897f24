"""Each table of the llmos TOML config as a typed struct, one module per
table. They live below the kernel and the services because both read them:
the kernel decodes the whole file before anything starts (kernel/config.py),
each service decodes its own table again from what the kernel hands it
(like vLLM's config module, shared by its engine and its workers)."""
