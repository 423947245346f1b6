"""`llama4-local serve`: the OpenAI API over the engine.

`protocol` holds the wire format (pydantic models), `tools` the tool-call parser, `serving`
turns requests into engine work and engine output into OpenAI responses, `app` the HTTP layer
(routes, queue, errors, logging).
"""
