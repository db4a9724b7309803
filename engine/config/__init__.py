"""Run configuration: the typed `RunConfig` (run_config.py: dataclasses, TOML + --set loading, validation
with errors that name the key) and the pinned engine argument names it checks against (engine_args.py)."""
