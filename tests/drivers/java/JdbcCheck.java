// pgJDBC checks: 20 connections on a thread pool, prepareThreshold=1 (server-side prepared
// statements from the first execution), batches, CopyManager, LISTEN/NOTIFY, Statement.cancel().
// Usage: java -cp postgresql.jar:. JdbcCheck postgres://user:pass@host:port/db
import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.sql.*;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicLong;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.core.BaseConnection;

public class JdbcCheck {
    static final int CLIENTS = 20;
    static final int CHECK_DEADLINE_S = 40;
    static final int BIG_N = 200000;
    static final String[][] TZ_EXPECT = {
        {"UTC", "2024-01-01 00:00:00+00"},
        {"Asia/Kolkata", "2024-01-01 05:30:00+05:30"},
        {"America/New_York", "2023-12-31 19:00:00-05"},
        {"Pacific/Chatham", "2024-01-01 13:45:00+13:45"},
        {"Europe/Berlin", "2024-01-01 01:00:00+01"},
        {"Asia/Tokyo", "2024-01-01 09:00:00+09"},
    };
    // Server connections of the pooler under test (transaction mode). A client that holds a
    // transaction open keeps one server connection; if it then needs a second connection of its
    // own (an observer checking what other sessions see), 20 such clients at once hold every
    // server and all observers wait forever: a deadlock by construction under any transaction
    // pooler. Those sections run with at most POOL_SIZE - 1 holders at once (one against Postgres
    // directly too), so a server is always left for observers; the rest stays concurrent.
    static final int POOL_SIZE = Integer.parseInt(Optional.ofNullable(System.getenv("POOL_SIZE")).orElse("2"));
    static final Semaphore HOLDERS = new Semaphore(Math.max(1, POOL_SIZE - 1), true);
    static String jdbcUrl;
    static String P, S, SA, SB;
    static int passed = 0, failed = 0;

    interface Body { void run() throws Exception; }
    interface ClientBody { void run(int i) throws Exception; }

    static class CheckFailed extends Exception { CheckFailed(String m) { super(m); } }

    static void expect(boolean cond, String what) throws CheckFailed { if (!cond) throw new CheckFailed(what); }

    static void expectEq(Object got, Object want, String what) throws CheckFailed {
        boolean eq;
        if (got instanceof byte[] && want instanceof byte[]) eq = Arrays.equals((byte[]) got, (byte[]) want);
        else if (got instanceof Object[] && want instanceof Object[]) eq = Arrays.deepEquals((Object[]) got, (Object[]) want);
        else eq = Objects.equals(got, want);
        if (!eq) throw new CheckFailed(what + ": got " + show(got) + ", want " + show(want));
    }

    static String show(Object o) {
        if (o instanceof byte[]) return "bytes" + Arrays.toString((byte[]) o);
        if (o instanceof Object[]) return Arrays.deepToString((Object[]) o);
        return String.valueOf(o) + (o == null ? "" : " (" + o.getClass().getSimpleName() + ")");
    }

    static void expectSqlstate(Statement st, String sql, String want) throws Exception {
        try {
            st.execute(sql);
        } catch (SQLException e) {
            expectEq(e.getSQLState(), want, "SQLSTATE of " + sql + " (" + e.getMessage() + ")");
            return;
        }
        throw new CheckFailed(sql + " succeeded, expected SQLSTATE " + want);
    }

    static Connection connect() throws SQLException {
        Connection c = DriverManager.getConnection(jdbcUrl);
        c.setAutoCommit(true);
        return c;
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static void runClients(int n, ClientBody fn) throws Exception {
        ExecutorService ex = Executors.newFixedThreadPool(n);
        CyclicBarrier barrier = new CyclicBarrier(n);
        List<Future<?>> fs = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            final int id = i;
            fs.add(ex.submit(() -> { barrier.await(10, TimeUnit.SECONDS); fn.run(id); return null; }));
        }
        ex.shutdown();
        List<String> errs = new ArrayList<>();
        long end = System.nanoTime() + TimeUnit.SECONDS.toNanos(CHECK_DEADLINE_S - 5);
        for (int i = 0; i < n; i++) {
            try {
                fs.get(i).get(Math.max(0, end - System.nanoTime()), TimeUnit.NANOSECONDS);
            } catch (ExecutionException e) {
                Throwable c = e.getCause();
                errs.add("client " + i + ": " + c.getClass().getSimpleName() + ": " + c.getMessage());
            } catch (TimeoutException e) {
                errs.add("client " + i + ": still running");
            }
        }
        ex.shutdownNow();
        if (!errs.isEmpty()) throw new CheckFailed(errs.size() + " of " + n + " clients failed, first: " + errs.get(0));
    }

    static void run(String name, Body b) {
        long t0 = System.nanoTime();
        ExecutorService ex = Executors.newSingleThreadExecutor(r -> { Thread t = new Thread(r); t.setDaemon(true); return t; });
        Future<?> f = ex.submit(() -> { b.run(); return null; });
        String err = null;
        try {
            f.get(CHECK_DEADLINE_S, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            err = "deadline of " + CHECK_DEADLINE_S + "s exceeded";
            f.cancel(true);
        } catch (ExecutionException e) {
            Throwable c = e.getCause();
            err = c.getClass().getSimpleName() + ": " + c.getMessage();
            if (System.getenv("DRIVERS_VERBOSE") != null) c.printStackTrace();
        } catch (InterruptedException e) {
            err = "interrupted";
        }
        ex.shutdownNow();
        double secs = (System.nanoTime() - t0) / 1e9;
        if (err == null) {
            passed++;
            System.out.printf("PASS jdbc/%s (%.2fs)%n", name, secs);
        } else {
            failed++;
            String r = err.replaceAll("\\s+", " ");
            System.out.println("FAIL jdbc/" + name + ": " + (r.length() > 600 ? r.substring(0, 600) : r));
        }
        System.out.flush();
    }

    static String copyText(int i) {
        return "row " + i + "\tcol\\x \"q\" 'a' é€ line\nnext " + (i * 7);
    }

    static String copyEsc(String v) {
        if (v == null) return "\\N";
        return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r");
    }

    static String md5hex(MessageDigest md, byte[] in) {
        md.reset();
        byte[] d = md.digest(in);
        return java.util.HexFormat.of().formatHex(d);
    }

    // ------------------------------------------------------------------ setup / cleanup

    static void setup() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            st.execute("CREATE SCHEMA " + S);
            st.execute("CREATE TABLE " + S + ".cr (client int, k int, v text)");
            st.execute("CREATE TABLE " + S + ".uniq (id int PRIMARY KEY)");
            st.execute("CREATE TABLE " + S + ".copy (id int PRIMARY KEY, t text, b bytea)");
            st.execute("CREATE TABLE " + S + ".batch (client int, k int, v text, ts timestamptz)");
            for (String[] sv : new String[][] {{SA, "a"}, {SB, "b"}}) {
                st.execute("CREATE SCHEMA " + sv[0]);
                st.execute("CREATE TABLE " + sv[0] + ".sp_t (v text)");
                st.execute("INSERT INTO " + sv[0] + ".sp_t VALUES ('" + sv[1] + "')");
            }
        }
    }

    static void cleanup() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            for (String s : new String[] {S, SA, SB}) st.execute("DROP SCHEMA IF EXISTS " + s + " CASCADE");
        }
    }

    // ------------------------------------------------------------------ checks

    static void checkTypes() throws Exception {
        runClients(CLIENTS, i -> {
            try (Connection c = connect()) {
                long bigint = 9007199254740993L + i * 1000003L;
                BigDecimal numeric = new BigDecimal("-12345678901234567890." + String.format("%02d", i) + "00000000000000000001");
                String text = "client " + i + ": héllo 'wörld' \"q\" \\ \t tab € 😀";
                OffsetDateTime ts = OffsetDateTime.of(2024, 2, 29, 12, 34, 56, (123456 + i) * 1000, ZoneOffset.UTC);
                UUID uuid = UUID.fromString(String.format("12345678-9abc-4def-8123-4567%08x", 0x89abcdef + i));
                byte[] bytea = new byte[259];
                for (int k = 0; k < 256; k++) bytea[k] = (byte) k;
                bytea[256] = (byte) i; bytea[257] = 0; bytea[258] = 92;
                String json = "{\"s\": \"é\\\"\\n\", \"client\": " + i + ", \"nested\": {\"a\": [1, 2.5, null, true, \"x\"]}}";
                Integer[] ints = {1, -2, null, 2147483647, i};
                String[] texts = {"a", "b,c", "{brace}", "\"quote\"", null, "NULL", "", "c" + i};
                String sql = "SELECT ?::int, ?::bigint, ?::numeric, ?::text, ?::timestamptz, ?::uuid, ?::bytea, ?::jsonb,"
                    + " ?::int[], ?::text[], ?::int, ?::text, (?::jsonb)::text";
                try (PreparedStatement ps = c.prepareStatement(sql)) {
                    for (int rep = 0; rep < 3; rep++) {
                        ps.setInt(1, -2147483000 + i);
                        ps.setLong(2, bigint);
                        ps.setBigDecimal(3, numeric);
                        ps.setString(4, text);
                        ps.setObject(5, ts);
                        ps.setObject(6, uuid);
                        ps.setBytes(7, bytea);
                        ps.setString(8, json);
                        ps.setArray(9, c.createArrayOf("int4", ints));
                        ps.setArray(10, c.createArrayOf("text", texts));
                        ps.setNull(11, Types.INTEGER);
                        ps.setNull(12, Types.VARCHAR);
                        ps.setString(13, json);
                        try (ResultSet rs = ps.executeQuery()) {
                            expect(rs.next(), "no row");
                            expectEq(rs.getInt(1), -2147483000 + i, "int");
                            expectEq(rs.getLong(2), bigint, "bigint");
                            expectEq(rs.getBigDecimal(3), numeric, "numeric");
                            expectEq(rs.getString(4), text, "text");
                            expectEq(rs.getObject(5, OffsetDateTime.class).toInstant(), ts.toInstant(), "timestamptz");
                            expectEq(rs.getObject(6), uuid, "uuid");
                            expectEq(rs.getBytes(7), bytea, "bytea");
                            expectEq(rs.getString(8), rs.getString(13), "jsonb (as the server renders it)");
                            expect(rs.getString(8).contains("\"client\": " + i + ","), "jsonb content: " + rs.getString(8));
                            expectEq(rs.getArray(9).getArray(), ints, "int[]");
                            expectEq(rs.getArray(10).getArray(), texts, "text[]");
                            expectEq(rs.getObject(11), null, "NULL int");
                            rs.getInt(11);
                            expect(rs.wasNull(), "wasNull for NULL int");
                            expectEq(rs.getString(12), null, "NULL text");
                            expect(!rs.next(), "extra row");
                        }
                    }
                }
                try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(
                        "SELECT 9223372036854775807::bigint, (-2147483648)::int, '0.000000000000000000001'::numeric,"
                        + " '2000-01-01 00:00:00.000001+00'::timestamptz, '\\x00ff'::bytea, ARRAY[[1,2],[3,4]]::int[], ARRAY['x', NULL]::text[], NULL::uuid")) {
                    rs.next();
                    expectEq(rs.getLong(1), Long.MAX_VALUE, "literal bigint");
                    expectEq(rs.getInt(2), Integer.MIN_VALUE, "literal int");
                    expectEq(rs.getBigDecimal(3), new BigDecimal("0.000000000000000000001"), "literal numeric");
                    expectEq(rs.getObject(4, OffsetDateTime.class).toInstant(),
                        OffsetDateTime.of(2000, 1, 1, 0, 0, 0, 1000, ZoneOffset.UTC).toInstant(), "literal timestamptz");
                    expectEq(rs.getBytes(5), new byte[] {0, (byte) 0xff}, "literal bytea");
                    expectEq(rs.getArray(6).getArray(), new Integer[][] {{1, 2}, {3, 4}}, "literal int[][]");
                    expectEq(rs.getArray(7).getArray(), new String[] {"x", null}, "literal text[]");
                    expectEq(rs.getObject(8), null, "literal NULL uuid");
                }
            }
        });
    }

    static void checkPrepared50x() throws Exception {
        runClients(CLIENTS, i -> {
            try (Connection c = connect();
                 PreparedStatement a = c.prepareStatement("SELECT ?::int * 2 AS d, ?::text AS t");
                 PreparedStatement b = c.prepareStatement("SELECT ?::text || '-x', ?::bigint + 1");
                 Statement st = c.createStatement()) {
                for (int k = 0; k < 50; k++) {
                    a.setInt(1, k + i * 1000); a.setString(2, "c" + i + "-" + k);
                    try (ResultSet rs = a.executeQuery()) {
                        rs.next();
                        expectEq(rs.getInt(1), (k + i * 1000) * 2, "prepared stmt A d");
                        expectEq(rs.getString(2), "c" + i + "-" + k, "prepared stmt A t");
                    }
                    b.setString(1, "c" + i); b.setLong(2, k);
                    try (ResultSet rs = b.executeQuery()) {
                        rs.next();
                        expectEq(rs.getString(1), "c" + i + "-x", "prepared stmt B");
                        expectEq(rs.getLong(2), (long) k + 1, "prepared stmt B");
                    }
                    expectEq(one(c, "SELECT " + k + " + " + i), String.valueOf(k + i), "plain statement");
                    if (k % 10 == 0) {
                        c.setAutoCommit(false);
                        a.setInt(1, k); a.setString(2, "tx");
                        try (ResultSet rs = a.executeQuery()) {
                            rs.next();
                            expectEq(rs.getInt(1), k * 2, "prepared stmt A in transaction");
                        }
                        c.commit();
                        c.setAutoCommit(true);
                    }
                }
                expect(a.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(), "statement A not server-prepared");
            }
        });
    }

    static void checkConcurrent() throws Exception {
        runClients(CLIENTS, i -> {
            try (Connection c = connect();
                 PreparedStatement ps = c.prepareStatement("SELECT ?::int AS me, ?::text AS tag, pg_backend_pid()")) {
                for (int k = 0; k < 50; k++) {
                    int me = i * 100000 + k;
                    ps.setInt(1, me); ps.setString(2, "tag-" + me);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        expectEq(rs.getInt(1), me, "echo me");
                        expectEq(rs.getString(2), "tag-" + me, "echo tag");
                    }
                }
            }
        });
    }

    static int count(Connection c, int client, int k) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM " + S + ".cr WHERE client = ? AND k = ?")) {
            ps.setInt(1, client); ps.setInt(2, k);
            try (ResultSet rs = ps.executeQuery()) { rs.next(); return rs.getInt(1); }
        }
    }

    // A section in which c holds a transaction open while another connection of the same client
    // needs a server: at most POOL_SIZE - 1 such sections at once. On failure c is rolled back
    // inside the section, so its server is free before the next holder starts.
    static void held(Connection c, Body b) throws Exception {
        HOLDERS.acquire();
        try {
            b.run();
        } catch (Exception e) {
            try { c.rollback(); } catch (SQLException ignored) { }
            throw e;
        } finally {
            HOLDERS.release();
        }
    }

    static void checkCommitRollback() throws Exception {
        runClients(CLIENTS, i -> {
            try (Connection c = connect(); Connection obs = connect()) {
                c.setAutoCommit(false);
                try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + S + ".cr VALUES (?, ?, ?)")) {
                    ins.setInt(1, i); ins.setInt(2, 1); ins.setString(3, "committed");
                    // c holds its transaction open while obs needs a server (twice below)
                    held(c, () -> {
                        ins.executeUpdate();
                        expectEq(count(obs, i, 1), 0, "uncommitted row visible to other connection");
                        expectEq(count(c, i, 1), 1, "own uncommitted row");
                        c.commit();
                    });
                    expectEq(count(obs, i, 1), 1, "committed row seen by other connection");
                    ins.setInt(2, 2); ins.setString(3, "rolled back");
                    ins.executeUpdate();
                    expectEq(count(c, i, 2), 1, "own row before rollback");
                    c.rollback();
                    // without autocommit, this count opens c's next transaction (which goes on
                    // with the savepoint part): it is open while obs needs a server
                    held(c, () -> {
                        expectEq(count(c, i, 2), 0, "rolled back row");
                        expectEq(count(obs, i, 2), 0, "rolled back row (other connection)");
                    });
                    // savepoint
                    ins.setInt(2, 3); ins.setString(3, "outer");
                    ins.executeUpdate();
                    Savepoint sp = c.setSavepoint();
                    ins.setInt(2, 4); ins.setString(3, "inner");
                    ins.executeUpdate();
                    c.rollback(sp);
                    c.commit();
                    expectEq(count(obs, i, 3), 1, "outer row of savepoint transaction");
                    expectEq(count(obs, i, 4), 0, "row rolled back to savepoint");
                }
            }
        });
    }

    static void checkErrors() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            st.execute("INSERT INTO " + S + ".uniq VALUES (-1)");
        }
        runClients(CLIENTS, i -> {
            try (Connection c = connect(); Statement st = c.createStatement();
                 PreparedStatement div = c.prepareStatement("SELECT 1 / ?::int");
                 PreparedStatement ins = c.prepareStatement("INSERT INTO " + S + ".uniq VALUES (?)")) {
                div.setInt(1, 0);
                try { div.executeQuery(); throw new CheckFailed("no division_by_zero"); }
                catch (SQLException e) { expectEq(e.getSQLState(), "22012", "SQLSTATE"); }
                expectEq(one(c, "SELECT " + i), String.valueOf(i), "query after 22012");
                ins.setInt(1, i);
                ins.executeUpdate();
                try { ins.executeUpdate(); throw new CheckFailed("no unique_violation"); }
                catch (SQLException e) { expectEq(e.getSQLState(), "23505", "SQLSTATE"); }
                expectEq(one(c, "SELECT 'ok" + i + "'"), "ok" + i, "query after 23505");
                expectSqlstate(st, "SELECT * FROM " + P + "_no_such_table_" + i, "42P01");
                expectSqlstate(st, "SELEC 1", "42601");
                div.setInt(1, 1);
                try (ResultSet rs = div.executeQuery()) { rs.next(); expectEq(rs.getInt(1), 1, "prepared after errors"); }
                c.setAutoCommit(false);
                ins.setInt(1, 1000 + i);
                ins.executeUpdate();
                expectSqlstate(st, "SELECT 1 / 0", "22012");
                expectSqlstate(st, "SELECT 1", "25P02");
                c.rollback();
                c.setAutoCommit(true);
                expectEq(one(c, "SELECT count(*) FROM " + S + ".uniq WHERE id = " + (1000 + i)), "0", "insert of failed transaction rolled back");
            }
        });
    }

    static void checkSearchPath() throws Exception {
        runClients(CLIENTS, i -> {
            String sch = i % 2 == 0 ? SA : SB, osch = i % 2 == 0 ? SB : SA;
            String want = i % 2 == 0 ? "a" : "b", other = i % 2 == 0 ? "b" : "a";
            try (Connection c = connect(); Statement st = c.createStatement()) {
                st.execute("SET search_path TO " + sch);
                try (PreparedStatement ps = c.prepareStatement("SELECT v FROM sp_t WHERE ?::int = 1")) {
                    for (int k = 0; k < 10; k++) {
                        expectEq(one(c, "SELECT v FROM sp_t"), want, "unqualified query #" + k);
                        c.setAutoCommit(false);
                        ps.setInt(1, 1);
                        try (ResultSet rs = ps.executeQuery()) { rs.next(); expectEq(rs.getString(1), want, "prepared, in a later transaction"); }
                        c.commit();
                        c.setAutoCommit(true);
                        Thread.sleep(2);
                    }
                }
                expectEq(one(c, "SHOW search_path"), sch, "SHOW search_path");
                c.setAutoCommit(false);
                st.execute("SET LOCAL search_path TO " + osch);
                expectEq(one(c, "SELECT v FROM sp_t"), other, "SET LOCAL inside");
                c.commit();
                c.setAutoCommit(true);
                expectEq(one(c, "SELECT v FROM sp_t"), want, "after SET LOCAL");
                c.setSchema(osch); // pgJDBC's own API, runs SET SESSION search_path
                expectEq(one(c, "SELECT v FROM sp_t"), other, "after Connection.setSchema");
                expectEq(c.getSchema(), osch, "Connection.getSchema");
                st.execute("RESET search_path");
                expectSqlstate(st, "SELECT v FROM sp_t", "42P01");
            }
        });
    }

    static void checkTimezone() throws Exception {
        runClients(CLIENTS, i -> {
            String tz = TZ_EXPECT[i % TZ_EXPECT.length][0], want = TZ_EXPECT[i % TZ_EXPECT.length][1];
            try (Connection c = connect(); Statement st = c.createStatement()) {
                st.execute("SET TimeZone TO '" + tz + "'");
                try (PreparedStatement ps = c.prepareStatement("SELECT ?::timestamptz::text")) {
                    for (int k = 0; k < 10; k++) {
                        expectEq(one(c, "SELECT '2024-01-01 00:00:00+00'::timestamptz::text"), want, "timestamptz text #" + k);
                        c.setAutoCommit(false);
                        ps.setString(1, "2024-01-01 00:00:00+00");
                        try (ResultSet rs = ps.executeQuery()) { rs.next(); expectEq(rs.getString(1), want, "in a later transaction"); }
                        c.commit();
                        c.setAutoCommit(true);
                        expectEq(one(c, "SHOW TimeZone"), tz, "SHOW TimeZone");
                        Thread.sleep(2);
                    }
                }
            }
        });
    }

    static void checkListenNotify() throws Exception {
        String chan = P + "_chan";
        try (Connection listener = connect(); Connection notifier = connect();
             Statement ls = listener.createStatement(); Statement ns = notifier.createStatement()) {
            ls.execute("LISTEN " + chan);
            for (int k = 0; k < 5; k++) { one(listener, "SELECT " + k); one(notifier, "SELECT " + k); }
            ns.execute("NOTIFY " + chan + ", 'hello-1'");
            try (PreparedStatement ps = notifier.prepareStatement("SELECT pg_notify(?, ?)")) {
                ps.setString(1, chan); ps.setString(2, "hello-2 é");
                ps.executeQuery().close();
            }
            PGConnection pgc = listener.unwrap(PGConnection.class);
            List<String> got = new ArrayList<>();
            long deadline = System.currentTimeMillis() + 5000;
            while (got.size() < 2 && System.currentTimeMillis() < deadline) {
                PGNotification[] ns2 = pgc.getNotifications((int) Math.max(1, deadline - System.currentTimeMillis()));
                if (ns2 != null) for (PGNotification n : ns2) got.add(n.getName() + ":" + n.getParameter());
            }
            expectEq(got, Arrays.asList(chan + ":hello-1", chan + ":hello-2 é"), "notifications within 5s");
            ls.execute("UNLISTEN " + chan);
            expectEq(one(listener, "SELECT 7"), "7", "listener usable");
        }
    }

    static void checkCopy() throws Exception {
        int n = 1000;
        StringBuilder in = new StringBuilder();
        for (int i = 1; i <= n; i++) {
            String t = i % 97 != 0 ? copyText(i) : null;
            String b = i % 5 != 0 ? String.format("\\x%02x005c0a", i % 256) : null;
            in.append(i).append('\t').append(copyEsc(t)).append('\t').append(copyEsc(b)).append('\n');
        }
        try (Connection c = connect()) {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            long rows = cm.copyIn("COPY " + S + ".copy (id, t, b) FROM STDIN", new StringReader(in.toString()));
            expectEq(rows, (long) n, "copyIn row count");
            expectEq(one(c, "SELECT count(*) || ',' || sum(id) FROM " + S + ".copy"), n + "," + (n * (n + 1) / 2), "rows after COPY FROM");
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT id, t, b FROM " + S + ".copy ORDER BY id")) {
                for (int i = 1; i <= n; i++) {
                    expect(rs.next(), "missing row " + i);
                    expectEq(rs.getInt(1), i, "id");
                    expectEq(rs.getString(2), i % 97 != 0 ? copyText(i) : null, "t of row " + i);
                    expectEq(rs.getBytes(3), i % 5 != 0 ? new byte[] {(byte) (i % 256), 0, 92, 10} : null, "b of row " + i);
                }
            }
            StringWriter out = new StringWriter();
            long outRows = cm.copyOut("COPY (SELECT id, t, b FROM " + S + ".copy ORDER BY id) TO STDOUT", out);
            expectEq(outRows, (long) n, "copyOut row count");
            expect(out.toString().equals(in.toString()), "COPY TO output differs (got " + out.toString().length() + " chars, want " + in.length() + ")");
            expectEq(one(c, "SELECT 1"), "1", "usable after COPY");
        }
    }

    static void checkCancel() throws Exception {
        try (Connection c = connect()) {
            for (int attempt = 0; attempt < 3; attempt++) {
                boolean inTx = attempt == 1;
                if (inTx) { c.setAutoCommit(false); one(c, "SELECT 1"); }
                try (PreparedStatement ps = c.prepareStatement("SELECT pg_sleep(?)")) {
                    ps.setInt(1, 10);
                    final AtomicLong tCancel = new AtomicLong();
                    ScheduledExecutorService ses = Executors.newSingleThreadScheduledExecutor();
                    long t0 = System.nanoTime();
                    if (attempt < 2) {
                        ses.schedule(() -> { tCancel.set(System.nanoTime()); try { ps.cancel(); } catch (SQLException e) { } }, 500, TimeUnit.MILLISECONDS);
                    } else {
                        ps.setQueryTimeout(1); // the driver's timer sends the cancel request
                        tCancel.set(t0 + TimeUnit.SECONDS.toNanos(1));
                    }
                    try {
                        ps.executeQuery();
                        throw new CheckFailed("pg_sleep(10) was not cancelled");
                    } catch (SQLException e) {
                        double took = (System.nanoTime() - tCancel.get()) / 1e9;
                        expectEq(e.getSQLState(), "57014", "SQLSTATE (" + e.getMessage() + ")");
                        expect(took < 2.0, "cancel took " + took + "s");
                    } finally {
                        ses.shutdownNow();
                    }
                    ps.setQueryTimeout(0);
                }
                if (inTx) { c.rollback(); c.setAutoCommit(true); }
                expectEq(one(c, "SELECT 42"), "42", "connection usable after cancel");
            }
        }
    }

    static void checkBigResult() throws Exception {
        MessageDigest outer = MessageDigest.getInstance("MD5"), inner = MessageDigest.getInstance("MD5");
        for (int g = 1; g <= BIG_N; g++) outer.update(md5hex(inner, String.valueOf(g).getBytes(StandardCharsets.UTF_8)).getBytes(StandardCharsets.UTF_8));
        byte[] want = outer.digest();
        try (Connection c = connect();
             PreparedStatement ps = c.prepareStatement("SELECT g, md5(g::text) FROM generate_series(1, ?) g")) {
            for (int fetch : new int[] {0, 5000}) {
                if (fetch > 0) c.setAutoCommit(false); // fetch size streams with a portal inside a transaction
                ps.setFetchSize(fetch);
                ps.setInt(1, BIG_N);
                outer.reset();
                int n = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        n++;
                        if (rs.getInt(1) != n) throw new CheckFailed("row " + n + " has g=" + rs.getInt(1));
                        outer.update(rs.getString(2).getBytes(StandardCharsets.UTF_8));
                    }
                }
                if (fetch > 0) { c.commit(); c.setAutoCommit(true); }
                expectEq(n, BIG_N, "row count (fetchSize=" + fetch + ")");
                expect(Arrays.equals(outer.digest(), want), "md5 checksum (fetchSize=" + fetch + ")");
            }
        }
    }

    static void checkBatch() throws Exception {
        runClients(CLIENTS, i -> {
            try (Connection c = connect()) {
                OffsetDateTime ts = OffsetDateTime.of(2024, 1, 1, 0, 0, 0, 0, ZoneOffset.UTC);
                try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + S + ".batch VALUES (?, ?, ?, ?)")) {
                    for (int k = 0; k < 1000; k++) {
                        ps.setInt(1, i); ps.setInt(2, k); ps.setString(3, "b" + i + "-" + k); ps.setObject(4, ts.plusSeconds(k));
                        ps.addBatch();
                    }
                    int[] res = ps.executeBatch();
                    expectEq(res.length, 1000, "batch result count");
                    for (int r : res) expect(r == 1 || r == Statement.SUCCESS_NO_INFO, "batch row result " + r);
                }
                expectEq(one(c, "SELECT count(*) || ',' || sum(k) || ',' || (max(ts) AT TIME ZONE 'UTC')::text FROM " + S + ".batch WHERE client = " + i),
                    "1000," + (999 * 1000 / 2) + ",2024-01-01 00:16:39", "batch rows");
                // a failing batch in a transaction: error reported, rollback leaves nothing
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + S + ".batch VALUES (?, ?, (?::text)::int::text, NULL)")) {
                    for (int k = 0; k < 10; k++) { ps.setInt(1, i); ps.setInt(2, 5000 + k); ps.setString(3, k == 9 ? "x" : String.valueOf(k)); ps.addBatch(); }
                    try { ps.executeBatch(); throw new CheckFailed("bad batch row did not fail"); }
                    catch (BatchUpdateException e) {
                        SQLException next = e.getNextException();
                        expectEq(next == null ? e.getSQLState() : next.getSQLState(), "22P02", "SQLSTATE of failed batch");
                    }
                }
                c.rollback();
                c.setAutoCommit(true);
                expectEq(one(c, "SELECT count(*) FROM " + S + ".batch WHERE client = " + i + " AND k >= 5000"), "0", "rows of failed batch");
                // a batch of plain statements
                try (Statement st = c.createStatement()) {
                    for (int k = 0; k < 100; k++) st.addBatch("INSERT INTO " + S + ".batch VALUES (" + i + ", " + (10000 + k) + ", 's', NULL)");
                    expectEq(st.executeBatch().length, 100, "statement batch");
                }
                expectEq(one(c, "SELECT count(*) FROM " + S + ".batch WHERE client = " + i + " AND k >= 10000"), "100", "statement batch rows");
            }
        });
    }

    static String dec(String s) { return URLDecoder.decode(s, StandardCharsets.UTF_8); }

    public static void main(String[] args) throws Exception {
        URI u = new URI(args[0]);
        String user = "postgres", pass = null;
        if (u.getRawUserInfo() != null) {
            String[] up = u.getRawUserInfo().split(":", 2);
            user = dec(up[0]);
            if (up.length > 1) pass = dec(up[1]);
        }
        String db = u.getPath() == null || u.getPath().length() <= 1 ? user : u.getPath().substring(1);
        int port = u.getPort() > 0 ? u.getPort() : 5432;
        jdbcUrl = "jdbc:postgresql://" + u.getHost() + ":" + port + "/" + db + "?prepareThreshold=1&connectTimeout=10&user="
            + java.net.URLEncoder.encode(user, StandardCharsets.UTF_8)
            + (pass != null ? "&password=" + java.net.URLEncoder.encode(pass, StandardCharsets.UTF_8) : "");
        P = "jdbc_" + String.format("%08x", new java.security.SecureRandom().nextInt());
        S = P; SA = P + "_sa"; SB = P + "_sb";
        try {
            setup();
        } catch (Exception e) {
            System.out.println("FAIL jdbc/setup: " + e);
            System.out.println("# jdbc: 0 passed, 1 failed");
            System.exit(1);
        }
        try {
            run("types", JdbcCheck::checkTypes);
            run("prepared_50x", JdbcCheck::checkPrepared50x);
            run("concurrent_own_answers", JdbcCheck::checkConcurrent);
            run("commit_rollback", JdbcCheck::checkCommitRollback);
            run("errors_sqlstate", JdbcCheck::checkErrors);
            run("search_path", JdbcCheck::checkSearchPath);
            run("timezone", JdbcCheck::checkTimezone);
            run("listen_notify", JdbcCheck::checkListenNotify);
            run("copy", JdbcCheck::checkCopy);
            run("cancel", JdbcCheck::checkCancel);
            run("big_result", JdbcCheck::checkBigResult);
            run("batch", JdbcCheck::checkBatch);
        } finally {
            try {
                cleanup();
            } catch (Exception e) {
                failed++;
                System.out.println("FAIL jdbc/cleanup: " + e);
            }
            System.out.println("# jdbc: " + passed + " passed, " + failed + " failed");
            System.out.flush();
            System.exit(failed > 0 ? 1 : 0);
        }
    }
}
