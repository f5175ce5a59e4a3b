#!/usr/bin/env python3
"""The backend side of the demo: POST /users {id, email} with an X-API-Key header,
as an application backend (e.g. a NestJS service) receives new users.
Idempotent on webhook-id: a redelivered event does not create a second profile."""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 3999
API_KEY = sys.argv[2] if len(sys.argv) > 2 else "demo-key"
profiles = {}
seen_events = set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/users":
            return self.reply(404, {"message": "not found"})
        if self.headers.get("X-API-Key") != API_KEY:
            return self.reply(401, {"message": "invalid API key"})
        user = json.loads(body)
        event = self.headers.get("webhook-id")
        if event in seen_events:
            print(f"[backend] duplicate event {event} ignored", flush=True)
            return self.reply(200, {"duplicate": True})
        seen_events.add(event)
        profiles[user["id"]] = user
        print(f"[backend] {time.strftime('%H:%M:%S')} new user {user['email']} ({user['id']}), "
              f"webhook-id {event} -> profile created", flush=True)
        self.reply(201, {"created": user["id"]})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    print(f"[backend] listening on http://127.0.0.1:{PORT}/users", flush=True)
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
