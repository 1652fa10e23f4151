"""The Knap document's Python example, as written; only the base URL is swapped (and the token read from the
environment). Run: KNEO_BASE_URL=http://127.0.0.1:8000 python examples/knap/clients/knap_client.py"""

import os

import requests
import json

access_token = os.environ.get("KNEO_API_KEY", "local")
base_url = os.environ.get("KNEO_BASE_URL", "http://127.0.0.1:8000")

url = f"{base_url}/api/knap-tools/run"
headers = {
    "Authorization": f"Bearer {access_token}",
    "Content-Type": "application/json"
}
payload = {
    "messages": [
        {
            "role": "user",
            "content": "What meetings do I have tomorrow?"
        }
    ],
    "tool_types": [
        {
            "tool_type": "google_calendar",
            "tool_description": "Access Google Calendar"
        }
    ],
    "stream_updates": True
}
with requests.post(url, headers=headers, json=payload, stream=True) as response:
    for line in response.iter_lines():
        if line:
            if line.startswith(b'data: '):
                data = json.loads(line[6:])
                print(f"Event: {data}")
                if data.get('type') == 'done':
                    print("Execution complete")
                    break
