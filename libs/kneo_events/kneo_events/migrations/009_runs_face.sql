-- Lists by face (GET /jobs, the console, the sandbox sweep): newest first within a face.
CREATE INDEX IF NOT EXISTS runs_face_created ON runs (face, created_at DESC);
