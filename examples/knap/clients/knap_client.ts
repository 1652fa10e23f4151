// The Knap document's TypeScript example, as written; only the base URL is swapped (and the token read from the
// environment). Compile and run (tests/clients has the TypeScript compiler):
//   tests/clients/node_modules/.bin/tsc --target es2022 --module es2022 --lib es2022,dom --outDir /tmp/knap examples/knap/clients/knap_client.ts
//   KNEO_BASE_URL=http://127.0.0.1:8000 node /tmp/knap/knap_client.js
declare const process: { env: Record<string, string | undefined> };
const BASE_URL = process.env.KNEO_BASE_URL || 'http://127.0.0.1:8000';
const accessToken = process.env.KNEO_API_KEY || 'local';

interface Message {
  role: string;
  content: string;
}
interface ToolType {
  tool_type: string;
  tool_description: string;
}
interface KnapRunRequest {
  messages: Message[];
  tool_types: ToolType[];
  stream_updates?: boolean;
  chat_id?: string;
  use_smart_cache?: boolean;
  knap_tool_uuid?: string;
}
async function executeKnapRun(
  accessToken: string,
  request: KnapRunRequest
): Promise<void> {
  const response = await fetch(`${BASE_URL}/api/knap-tools/run`, {
    method: 'POST',
    headers: {
      'Authorization': `Bearer ${accessToken}`,
      'Content-Type': 'application/json'
    },
    body: JSON.stringify(request)
  });
  if (!response.ok) {
    throw new Error(`API error: ${response.statusText}`);
  }
  const reader = response.body?.getReader();
  if (!reader) throw new Error('No response body');
  const decoder = new TextDecoder();
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    const chunk = decoder.decode(value);
    const events = chunk.split('\n\n').filter(Boolean);
    for (const event of events) {
      if (event.startsWith('data: ')) {
        const data = JSON.parse(event.slice(6));
        switch (data.type) {
          case 'tool_execution':
            console.log(`Tool ${data.tool_name}: ${data.status}`);
            break;
          case 'message_chunk':
            console.log(`Agent: ${data.content}`);
            break;
          case 'done':
            console.log('Execution complete');
            return;
          case 'error':
            console.error('Error:', data.error);
            break;
        }
      }
    }
  }
}
// Usage
await executeKnapRun(accessToken, {
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
});
export {};
