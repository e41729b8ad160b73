-- Schema and workload for the golden pgoutput corpus (PostgreSQL 15).
-- Run by tests/corpus/capture/capture.py against a throwaway cluster.
SET TimeZone = 'UTC';
CREATE TABLE content (
    id              UUID PRIMARY KEY,
    slug            TEXT UNIQUE NOT NULL,
    title           TEXT        NOT NULL,
    content_type    TEXT CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds  INTEGER,
    publish_ts      TIMESTAMPTZ NOT NULL
);
CREATE TABLE engagement_events (
    id           BIGSERIAL PRIMARY KEY,
    content_id   UUID REFERENCES content(id),
    user_id      UUID,
    event_type   TEXT CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts     TIMESTAMPTZ NOT NULL,
    duration_ms  INTEGER,
    device       TEXT,
    raw_payload  JSONB
);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE alltypes (
    id int PRIMARY KEY,
    c_bool bool, c_bytea bytea, c_name name, c_int8 int8, c_int2 int2, c_int4 int4, c_text text,
    c_json json, c_float4 float4, c_float8 float8, c_bpchar char(5), c_varchar varchar(20),
    c_date date, c_time time, c_timestamp timestamp, c_timestamptz timestamptz, c_interval interval,
    c_timetz timetz, c_numeric numeric, c_uuid uuid, c_jsonb jsonb, c_inet inet, c_cidr cidr,
    c_mood mood, c_posint posint,
    a_bool bool[], a_bytea bytea[], a_int2 int2[], a_int4 int4[], a_int8 int8[], a_text text[],
    a_varchar varchar[], a_float4 float4[], a_float8 float8[], a_numeric numeric[], a_uuid uuid[],
    a_date date[], a_timestamp timestamp[], a_timestamptz timestamptz[], a_jsonb jsonb[], a_json json[],
    a_inet inet[], a_cidr cidr[], a_bpchar char(3)[], a_time time[], a_interval interval[], a_timetz timetz[],
    a_int4_2d int4[]
);
CREATE TABLE toasty (id int PRIMARY KEY, big text, n int);
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE full_ident (id int, note text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR ALL TABLES;
SELECT pg_create_logical_replication_slot('slot_main', 'pgoutput');
SELECT pg_create_logical_replication_slot('slot_2pc', 'pgoutput', false, true);

INSERT INTO content VALUES
('550e8400-e29b-41d4-a716-446655440000', 'test-episode', 'Test Episode', 'podcast', 1200, '2026-11-28 12:00:00.123+00'),
('550e8400-e29b-41d4-a716-446655440002', 'no-length', 'Ünïcödé — title', 'video', NULL, '2026-11-28 17:30:00+05:30');
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES
('550e8400-e29b-41d4-a716-446655440000', '550e8400-e29b-41d4-a716-446655440001', 'play', '2026-11-28 12:00:05.5+00', 30000, 'web', '{"source": "test"}'),
('550e8400-e29b-41d4-a716-446655440000', '550e8400-e29b-41d4-a716-446655440001', 'pause', '2026-11-28 07:00:06-05', NULL, NULL, NULL);

INSERT INTO alltypes VALUES (1,
  true, '\x00ff10'::bytea, 'a_name', 9223372036854775807, -32768, 2147483647, 'tab	quote" back\ nl
end',
  '{"a": [1, 2.50, null], "ü": "ß"}', 3.14159, 2.718281828459045, 'ab', 'varchar ✓',
  '2026-11-28', '04:05:06.789', '2026-11-28 12:00:00.123456', '2026-11-28 12:00:00.123+00', '1 year 2 mons 3 days 04:05:06.5',
  '04:05:06+05:30', 12345678901234567890.123456789012345678, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"emoji": "😀", "text": "日本語", "n": 1.0e2, "nested": {"k": [true, false]}}', '192.168.1.5/24', '10.0.0.0/8',
  'happy', 42,
  '{t,f,NULL}', '{"\\x00ab",NULL}', '{1,-2,NULL}', '{1,2,3}', '{9223372036854775807,-1}', '{"a b","c,d","e\"f","g\\h",NULL,"NULL",""}',
  '{x,y}', '{1.5,NaN,Infinity,-Infinity}', '{1e300,-0,5e-324}', '{1.10,-0.000001,NaN,123456789012345678901234567890}',
  '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
  '{2026-11-28,infinity,-infinity}', '{"2026-11-28 12:00:00",infinity}', '{"2026-11-28 12:00:00+00","2026-11-28 12:00:00-07:00",-infinity}',
  ARRAY['{"a":1}'::jsonb, '[]'::jsonb], ARRAY['{"b": 2}'::json], '{::1,10.1.2.3}', '{2001:db8::/32}',
  '{ab,c}', '{00:00:00,23:59:59.999999}', '{"1 day","-1 mons -00:00:01",P1Y2M3DT4H5M6S}', '{10:00:00+02,10:00:00-03:30}',
  '{{1,2,3},{4,5,6}}');
INSERT INTO alltypes (id) VALUES (2);
INSERT INTO alltypes (id, c_date, c_timestamp, c_timestamptz, c_numeric, c_float4, c_float8, c_interval, c_text, c_bytea, c_time, c_timetz)
VALUES (3, '-infinity', 'infinity', '-infinity', 'NaN', 'NaN', '-Infinity', '-1 years -2 mons +3 days -04:05:06.000001', '', '', '24:00:00', '00:00:00-12');
INSERT INTO alltypes (id, c_date, c_timestamp, c_timestamptz, c_numeric, c_float8, c_interval)
VALUES (4, '0044-03-15 BC', '1999-12-31 23:59:59.999999', '1900-01-01 00:00:00+01:00:12', '-0.0000000000000000000000000001', 1e-310, '178000000 years');
INSERT INTO alltypes (id, c_timestamptz, c_numeric) VALUES (5, '2026-06-01 09:00:00 America/New_York', '1e-20');
INSERT INTO alltypes (id, c_timestamptz, c_numeric) VALUES (6, '2026-06-01 09:00:00 Asia/Kathmandu', '0');

INSERT INTO toasty VALUES (1, repeat('toast-me-', 300), 1);
UPDATE toasty SET n = 2 WHERE id = 1;
INSERT INTO full_ident VALUES (1, 'one'), (2, NULL);
UPDATE full_ident SET note = 'uno' WHERE id = 1;
DELETE FROM full_ident WHERE id = 2;
UPDATE content SET length_seconds = 1300 WHERE slug = 'test-episode';
UPDATE content SET id = '550e8400-e29b-41d4-a716-446655440003' WHERE slug = 'no-length';
DELETE FROM engagement_events WHERE event_type = 'pause';
SELECT pg_logical_emit_message(true, 'pgfanout', 'transactional ✓');
SELECT pg_logical_emit_message(false, 'pgfanout', '\x00ff'::bytea);
BEGIN;
INSERT INTO full_ident VALUES (3, 'in-tx');
SELECT pg_logical_emit_message(true, 'pgfanout', 'in tx');
COMMIT;
TRUNCATE full_ident;
TRUNCATE toasty, full_ident RESTART IDENTITY CASCADE;

-- replication origin (Origin message)
SELECT pg_replication_origin_create('origin_a');
SELECT pg_replication_origin_session_setup('origin_a');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/AB', now());
INSERT INTO full_ident VALUES (10, 'from origin');
COMMIT;
SELECT pg_replication_origin_session_reset();

-- big transaction (streamed with logical_decoding_work_mem = 64kB), with a rolled back subtransaction
BEGIN;
INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
SELECT '550e8400-e29b-41d4-a716-446655440000', '550e8400-e29b-41d4-a716-446655440001', 'play',
       '2026-11-28 12:00:00+00'::timestamptz + g * interval '1 second', g * 10, 'ios', jsonb_build_object('seq', g)
FROM generate_series(1, 300) g;
SAVEPOINT s1;
INSERT INTO full_ident SELECT g, repeat('x', 200) FROM generate_series(100, 500) g;
ROLLBACK TO SAVEPOINT s1;
INSERT INTO full_ident VALUES (11, 'after savepoint');
COMMIT;
-- big transaction that is rolled back (Stream Abort)
BEGIN;
INSERT INTO full_ident SELECT g, repeat('y', 200) FROM generate_series(1000, 1400) g;
ROLLBACK;

-- two-phase
BEGIN;
INSERT INTO full_ident VALUES (20, 'prepared then committed');
PREPARE TRANSACTION 'gid-commit';
COMMIT PREPARED 'gid-commit';
BEGIN;
INSERT INTO full_ident VALUES (21, 'prepared then rolled back');
PREPARE TRANSACTION 'gid-rollback';
ROLLBACK PREPARED 'gid-rollback';
-- big prepared transaction (Stream Prepare with streaming on)
BEGIN;
INSERT INTO full_ident SELECT g, repeat('z', 200) FROM generate_series(2000, 2400) g;
PREPARE TRANSACTION 'gid-big';
COMMIT PREPARED 'gid-big';
