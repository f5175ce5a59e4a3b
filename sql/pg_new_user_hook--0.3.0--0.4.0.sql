-- pg_new_user_hook 0.3.0 → 0.4.0 (ALTER EXTENSION pg_new_user_hook UPDATE TO '0.4.0').
-- Queued events are kept as they are; nothing is rebuilt.

-- Whether this session queues the users it inserts (pg_new_user_hook.capture).
CREATE FUNCTION new_user_hook."capturing"() RETURNS bool
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'capturing_wrapper';

-- The allow-listed snapshot of a user, shared by capture() and backfill().
CREATE FUNCTION new_user_hook.snapshot(table_schema name, table_name name, user_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    snap jsonb;
BEGIN
    IF table_schema = 'auth' AND table_name = 'users' THEN
        -- The allow-list (request::ALLOWED_FIELDS): never the password hash, a token,
        -- or app metadata beyond the provider names.
        SELECT jsonb_build_object(
                   'id', u.id, 'email', u.email, 'phone', u.phone, 'aud', u.aud, 'role', u.role,
                   'created_at', u.created_at, 'updated_at', u.updated_at, 'confirmed_at', u.confirmed_at,
                   'email_confirmed_at', u.email_confirmed_at, 'phone_confirmed_at', u.phone_confirmed_at,
                   'last_sign_in_at', u.last_sign_in_at,
                   'is_anonymous', u.is_anonymous, 'is_sso_user', u.is_sso_user,
                   'raw_user_meta_data', u.raw_user_meta_data,
                   'raw_app_meta_data', jsonb_build_object('provider', u.raw_app_meta_data -> 'provider',
                                                           'providers', u.raw_app_meta_data -> 'providers'))
          INTO snap
          FROM auth.users AS u WHERE u.id = snapshot.user_id;
    ELSE
        EXECUTE format('SELECT jsonb_build_object(''id'', t.id, ''email'', t.email) FROM %I.%I AS t WHERE t.id = $1',
                       table_schema, table_name)
           INTO snap USING user_id;
    END IF;
    RETURN snap;
END
$$;

-- capture() skips users inserted with pg_new_user_hook.capture off, and takes its
-- snapshot from snapshot().
CREATE OR REPLACE FUNCTION new_user_hook.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    snapshot jsonb;
BEGIN
    IF TG_WHEN <> 'AFTER' OR TG_LEVEL <> 'ROW' OR TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'new_user_hook.capture() must run AFTER INSERT ... FOR EACH ROW, not % % ... FOR EACH %',
            TG_WHEN, TG_OP, TG_LEVEL
            USING HINT = 'Use SELECT new_user_hook.install(''schema.table''), which creates the right trigger.';
    END IF;
    -- Reading the setting is cheap; capturing() confirms an "off" with the library loaded.
    IF current_setting('pg_new_user_hook.capture', true) = 'off' AND NOT new_user_hook.capturing() THEN
        RETURN NULL;
    END IF;
    snapshot := new_user_hook.snapshot(TG_TABLE_SCHEMA, TG_TABLE_NAME, NEW.id);
    IF snapshot IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO new_user_hook.outbox (user_id, source, record)
    VALUES (NEW.id, format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), snapshot);
    PERFORM new_user_hook.wake_on_commit();
    RETURN NULL;
END
$$;

-- Announces existing users once.
CREATE FUNCTION new_user_hook.backfill(user_ids uuid[], target text DEFAULT 'auth.users') RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    rel_schema name;
    rel_name name;
    event_source text;
    n bigint;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table "%" does not exist', target
            USING HINT = 'Pass the schema-qualified name of the users table, as given to new_user_hook.install().';
    END IF;
    SELECT c.relname, ns.nspname INTO rel_name, rel_schema
      FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace WHERE c.oid = rel;
    event_source := format('%I.%I', rel_schema, rel_name);
    INSERT INTO new_user_hook.outbox (id, user_id, source, record)
    SELECT encode(set_byte(set_byte(h, 6, (get_byte(h, 6) & 15) | 128), 8, (get_byte(h, 8) & 63) | 128), 'hex')::uuid,
           u.id, event_source, u.record
      FROM (SELECT DISTINCT id FROM unnest(user_ids) AS ids(id) WHERE id IS NOT NULL) AS chosen,
           LATERAL (SELECT chosen.id, new_user_hook.snapshot(rel_schema, rel_name, chosen.id) AS record) AS u,
           -- A name-based UUID (version 8): the first 16 bytes of a SHA-256.
           LATERAL (SELECT substring(sha256(convert_to('pg_new_user_hook backfill ' || event_source || ' ' || u.id, 'UTF8'))
                                     FROM 1 FOR 16) AS h) AS digest
     WHERE u.record IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox o WHERE o.user_id = u.id AND o.source = event_source)
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM new_user_hook.wake_on_commit();
    END IF;
    RETURN n;
END
$$;

-- As a fresh install: nothing for PUBLIC (capture() calls these with its owner's rights).
REVOKE ALL ON FUNCTION new_user_hook.capturing(), new_user_hook.snapshot(name, name, uuid),
                       new_user_hook.backfill(uuid[], text) FROM PUBLIC;
