-- The worker's session settings and the transactions that must read one snapshot
-- (processor/store/session.py runs these).

-- name: session_configure
-- The worker's own session limits (processor.settings): a stopped worker's session is ended by
-- the server, which releases its consumer lock.
SELECT set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('idle_session_timeout', %(session_timeout)s, false),
       set_config('idle_in_transaction_session_timeout', %(session_timeout)s, false)

-- name: backend_pid
-- The backend this transaction runs in (processor.database's transaction-pooling check).
SELECT pg_backend_pid()

-- name: transaction_snapshot
-- First statement of a transaction whose statements must all see one snapshot (verify, backlog).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY
