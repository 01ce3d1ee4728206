"""Per-model key tables: functions from a model config to a list of convert.keymap.Rule."""
