"""The vocabulary every other package shares, importing nothing of theirs: the canonical
task and its statuses (`models`), every Redis key (`constants`), settings (`settings`),
signed tokens (`tokens`), the exception hierarchy (`errors`), abuse limits (`limits`), log
redaction (`logs`), the API's shared typed models (`schema`) and how a route documents
itself (`docs`), and what the app hands its HTTP protocols (`lifespan`)."""
