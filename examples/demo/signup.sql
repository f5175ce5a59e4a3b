-- What Supabase Auth (GoTrue) runs in the database for one email signup, in one
-- transaction, as supabase_auth_admin (search_path = auth).
-- psql variable: email.
BEGIN;
INSERT INTO users (instance_id, id, aud, role, email, encrypted_password, confirmation_token,
                   raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous, is_sso_user)
VALUES ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated', '', :'email',
        '$2a$10$abcdefghijklmnopqrstuv', '',
        '{"provider":"email","providers":["email"]}', '{}', now(), now(), false, false);
UPDATE users SET role = 'authenticated', updated_at = now() WHERE email = :'email';
INSERT INTO identities (provider_id, user_id, identity_data, provider, last_sign_in_at, created_at, updated_at)
SELECT id::text, id, jsonb_build_object('sub', id::text, 'email', email), 'email', now(), now(), now()
  FROM users WHERE email = :'email';
COMMIT;
