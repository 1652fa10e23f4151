// The Knap document's JavaScript example, as written; only the base URL is swapped (and the token read from the
// environment). Run: KNEO_BASE_URL=http://127.0.0.1:8000 node examples/knap/clients/knap_client.mjs
const BASE_URL = process.env.KNEO_BASE_URL || 'http://127.0.0.1:8000';
const accessToken = process.env.KNEO_API_KEY || 'local';

const response = await fetch(`${BASE_URL}/api/knap-tools/run`, {
  method: 'POST',
  headers: {
    'Authorization': `Bearer ${accessToken}`,
    'Content-Type': 'application/json'
  },
  body: JSON.stringify({
    messages: [
      {
        role: 'user',
        content: 'What meetings do I have tomorrow?'
      }
    ],
    tool_types: [
      {
        tool_type: 'google_calendar',
        tool_description: 'Access Google Calendar'
      }
    ],
    stream_updates: true
  })
});

// Handle streaming response
const reader = response.body.getReader();
const decoder = new TextDecoder();

while (true) {
  const { done, value } = await reader.read();
  if (done) break;

  const chunk = decoder.decode(value);
  const events = chunk.split('\n\n').filter(Boolean);

  for (const event of events) {
    if (event.startsWith('data: ')) {
      const data = JSON.parse(event.slice(6));
      console.log('Event:', data);

      if (data.type === 'done') {
        console.log('Execution complete');
      }
    }
  }
}
