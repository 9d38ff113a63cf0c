-- What the catalog says about the application's tables and the product's objects on them
-- (processor/app_schema.py, processor/schema_check.py, processor/migrate.py's plan), and the few
-- statements that repair them inside `outbox migrate`'s transaction.

-- name: app_tables_present
SELECT to_regclass('jobs') IS NOT NULL AS jobs, to_regclass('jobs_variants') IS NOT NULL AS jobs_variants

-- name: app_job_id_index
-- A btree index of jobs_variants that leads with job_id, whole and valid (migration 0001 uses one
-- rather than add its own; as 0001's test, which this one must match).
SELECT i.indexrelid::regclass::text
FROM pg_index AS i
WHERE i.indrelid = 'jobs_variants'::regclass
  AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'jobs_variants'::regclass AND attname = 'job_id')
  AND i.indpred IS NULL AND i.indisvalid
  AND (SELECT relam FROM pg_class WHERE oid = i.indexrelid) = (SELECT oid FROM pg_am WHERE amname = 'btree')
ORDER BY 1
LIMIT 1

-- name: app_variants_count
SELECT count(*) FROM jobs_variants WHERE job_id IS NOT NULL

-- name: app_column_types
-- The types of the application's columns that the product reads and writes (processor/app_schema.py):
-- as format_type() spells it; the type's own name, qualified (what a cast function returns: bpchar,
-- not "character", which means char(1)); the length limit, through domains; and whether the type
-- (through domains) is a string type, to which text is assigned as it is, length checked.
WITH RECURSIVE col AS (
    SELECT c.relname, a.attname, a.atttypid, a.atttypmod
    FROM pg_attribute AS a
    JOIN pg_class AS c ON c.oid = a.attrelid
    WHERE a.attrelid IN (to_regclass('jobs'), to_regclass('jobs_variants'))
      AND a.attname IN ('status', 'current_step')
      AND NOT a.attisdropped
), base AS (  -- down through domains: a domain's base may be a domain too
    SELECT col.relname, col.attname, col.atttypid AS typid, col.atttypmod AS typmod
    FROM col
    UNION ALL
    SELECT b.relname, b.attname, t.typbasetype, t.typtypmod
    FROM base AS b
    JOIN pg_type AS t ON t.oid = b.typid AND t.typtype = 'd'
)
SELECT col.relname::text AS table_name, col.attname::text AS column_name,
       format_type(col.atttypid, col.atttypmod) AS type,
       quote_ident(n.nspname) || '.' || quote_ident(t.typname) AS type_name,
       (SELECT min(information_schema._pg_char_max_length(b.typid, b.typmod)) FROM base AS b
        WHERE b.relname = col.relname AND b.attname = col.attname)::integer AS max_length,
       coalesce((SELECT bt.typcategory = 'S' FROM base AS b JOIN pg_type AS bt ON bt.oid = b.typid
        WHERE b.relname = col.relname AND b.attname = col.attname AND bt.typtype <> 'd'), false) AS is_string
FROM col
JOIN pg_type AS t ON t.oid = col.atttypid
JOIN pg_namespace AS n ON n.oid = t.typnamespace
ORDER BY col.relname, col.attname

-- name: app_cast_function_get
-- A cast function's return type (as app_column_types names it), its body, and who may execute it ("-": PUBLIC).
SELECT (SELECT quote_ident(n.nspname) || '.' || quote_ident(t.typname)
        FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace WHERE t.oid = p.prorettype) AS returns,
       p.prosrc AS body,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '-' ELSE (SELECT rolname FROM pg_roles WHERE oid = a.grantee) END
             FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
             WHERE a.privilege_type = 'EXECUTE')::text[] AS executors
FROM pg_proc AS p
WHERE p.oid = to_regprocedure(%(name)s || '(text)')

-- name: product_triggers_get
-- The product's triggers on the application's tables, and whether each fires (processor/schema_check.py).
SELECT c.relname::text AS table_name, t.tgname::text AS trigger, t.tgenabled::text AS enabled
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE t.tgrelid IN (to_regclass('jobs'), to_regclass('jobs_variants'))
  AND t.tgname LIKE 'outbox\_%%'
  AND NOT t.tgisinternal

-- name: app_triggers_get
-- Triggers on jobs_variants other than the product's, with their function, its text (prosrc; the
-- whole definition for a SQL-standard body, whose prosrc is empty) and the trigger's arguments.
SELECT t.tgname::text AS trigger, p.oid::regprocedure::text AS function,
       CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_functiondef(p.oid) ELSE p.prosrc END AS source,
       coalesce(string_to_array(rtrim(encode(t.tgargs, 'escape'), E'\\000'), E'\\000'), '{}') AS arguments
FROM pg_trigger AS t
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE t.tgrelid = to_regclass('jobs_variants')
  AND NOT t.tgisinternal
  AND t.tgname NOT LIKE 'outbox\_%%'
ORDER BY t.tgname

-- name: app_functions_get
-- The functions a name resolves to, as PostgreSQL would (qualified: in that schema; else through
-- the search path), the system's and the product's left out, with their text.
SELECT p.oid::regprocedure::text AS function,
       CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_functiondef(p.oid) ELSE p.prosrc END AS source
FROM pg_proc AS p
JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE p.proname = (%(parts)s::text[])[cardinality(%(parts)s::text[])]
  AND CASE WHEN cardinality(%(parts)s::text[]) > 1 THEN n.nspname = (%(parts)s::text[])[cardinality(%(parts)s::text[]) - 1]
           ELSE n.nspname = ANY(current_schemas(false)) END
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND p.proname NOT LIKE 'outbox\_%%'

-- name: relation_is_jobs
-- Whether a name (its parts) resolves to the jobs table, or to a view whose query reads it.
WITH target AS (
    SELECT to_regclass(array_to_string(ARRAY(SELECT quote_ident(x) FROM unnest(%(parts)s::text[]) AS x), '.')) AS oid
)
SELECT t.oid = to_regclass('jobs')
    OR EXISTS (
        SELECT FROM pg_rewrite AS r
        JOIN pg_depend AS d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
        WHERE r.ev_class = t.oid AND d.refobjid = to_regclass('jobs')
    )
FROM target AS t

-- name: trigger_create_outbox_capture_variant_insert_delete
-- As schema/schema.sql creates them (migrate puts back a product trigger dropped or disabled).
CREATE TRIGGER outbox_capture_variant_insert_delete
    AFTER INSERT OR DELETE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_change()

-- name: trigger_create_outbox_capture_variant_update
CREATE TRIGGER outbox_capture_variant_update
    AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_capture_variant_update()

-- name: trigger_create_outbox_guard_job_state
CREATE TRIGGER outbox_guard_job_state
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (current_setting('outbox.job_writer', true) IS DISTINCT FROM 'processor:13')
    EXECUTE FUNCTION outbox_guard_job_state()
