-- Fixed work for sqlite3 in benches/real_programs.py: an in-memory table,
-- an index, a join, an aggregate and a sort.
PRAGMA cache_size = -16000;
CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c INTEGER);
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 60000)
INSERT INTO t SELECT x, printf('%08d-%s', (x * 7919) % 100003, hex(x * 31)), x % 97 FROM n;
CREATE INDEX tb ON t(b);
SELECT c, count(*), sum(length(b)) FROM t GROUP BY c ORDER BY 2 DESC LIMIT 3;
SELECT count(*) FROM t AS x JOIN t AS y ON x.c = y.a;
SELECT b FROM t ORDER BY b DESC LIMIT 1;
