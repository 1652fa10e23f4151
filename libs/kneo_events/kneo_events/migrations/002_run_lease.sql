-- A lease on a run while a long step executes, or after the reconciler resent its command: the reconciler skips
-- runs whose lease is still valid. Not derived from events (it is a coordination hint, not state); a rebuild
-- clears it, which at worst lets the reconciler resend one harmless duplicate command.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS lease_until timestamptz;
