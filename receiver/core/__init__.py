"""The vocabulary every other package shares, importing nothing of theirs: the canonical
task and its statuses (`models`), every Redis key (`constants`), settings (`settings`),
signed tokens (`tokens`), the exception hierarchy (`errors`), abuse limits (`limits`) and
log redaction (`logs`)."""
