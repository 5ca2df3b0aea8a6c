"""Serve a chat model: a web chat and an OpenAI-compatible API (FastAPI + uvicorn).

    python -m daychat.serve --model models/sft            # http://127.0.0.1:8000

app.py holds the routes, api.py the request validation and OpenAI-style errors, worker.py the one-at-a-time
generation queue, chat.html the page.
"""
