"""The Responses API (``/v1/responses``) answered by any chat-completions model.

``request`` validates a request and translates it to chat completions; ``history`` turns items
(new input, or stored ones for ``previous_response_id``) into chat messages; ``events`` turns the
chat answer back into Responses events and Response objects.
"""
