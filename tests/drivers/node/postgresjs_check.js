'use strict'
// postgres.js (`postgres`) checks: pool of max 20, implicitly prepared tagged-template queries,
// reserve(), listen/notify, COPY via .writable()/.readable(), query.cancel(), pipelining on one
// connection.   Usage: node postgresjs_check.js URL
const crypto = require('crypto')
const { Readable } = require('stream')
const { pipeline } = require('stream/promises')
const postgres = require('postgres')
const {
  CLIENTS, BIG_N, TZ_EXPECT, runPrefix, copyText, copyEsc, typeValues, bigExpectedDigest,
  expectEq, expect, expectSqlstate, gatherClients, sleep, withDeadline, Reporter, holderSlots
} = require('./common')

const URL = process.argv[2]
const DRIVER = 'postgresjs'
const P = runPrefix('postgresjs')
const S = P
const SA = P + '_sa'
const SB = P + '_sb'
const opts = { connect_timeout: 10, onnotice: () => {}, idle_timeout: 0 }
const plain = (rows) => rows.map((r) => ({ ...r }))
const instances = []

function newSql (extra = {}) {
  const s = postgres(URL, { ...opts, ...extra })
  instances.push(s)
  return s
}

// a reserved connection for fn; if fn fails (perhaps inside BEGIN), it is rolled back before it
// goes back to the pool (postgres.js cannot destroy a reserved connection), so a later check
// never gets a connection left in a transaction
async function withReserved (sql, fn) {
  const c = await sql.reserve()
  try {
    return await fn(c)
  } catch (e) {
    await withDeadline(c.unsafe('ROLLBACK'), 5000, 'ROLLBACK after failure').catch(() => {})
    throw e
  } finally { c.release() }
}

async function setup (sql) {
  await sql.unsafe(`CREATE SCHEMA ${S}`)
  await sql.unsafe(`CREATE TABLE ${S}.cr (client int, k int, v text)`)
  await sql.unsafe(`CREATE TABLE ${S}.uniq (id int PRIMARY KEY)`)
  await sql.unsafe(`CREATE TABLE ${S}.copy (id int PRIMARY KEY, t text, b bytea)`)
  await sql.unsafe(`CREATE TABLE ${S}.pl (client int, k int, v text)`)
  for (const [sch, val] of [[SA, 'a'], [SB, 'b']]) {
    await sql.unsafe(`CREATE SCHEMA ${sch}`)
    await sql.unsafe(`CREATE TABLE ${sch}.sp_t (v text)`)
    await sql.unsafe(`INSERT INTO ${sch}.sp_t VALUES ($1)`, [val])
  }
}

async function cleanup (sql) {
  for (const sch of [S, SA, SB]) await sql.unsafe(`DROP SCHEMA IF EXISTS ${sch} CASCADE`)
}

async function checkTypes (sql) {
  await gatherClients(CLIENTS, async (i) => {
    const v = typeValues(i)
    // postgres.js 3.4 mishandles NULL array elements (a driver quirk, the same against Postgres
    // directly: a null in a text[] parameter arrives as the string "NULL", a NULL int[] element
    // is decoded as NaN), so its arrays carry no null element; scalar NULLs are checked below
    v.text_array = v.text_array.filter((x) => x !== null)
    v.int_array = v.int_array.filter((x) => x !== null)
    const want = { ...v, null_int: null, null_text: null }
    for (let rep = 0; rep < 3; rep++) {
      const r = await sql`SELECT ${v.int}::int AS int, ${v.bigint}::bigint AS bigint, ${v.numeric}::numeric AS numeric,
        ${v.text}::text AS text, ${v.timestamptz}::timestamptz AS timestamptz, ${v.uuid}::uuid AS uuid,
        ${v.bytea}::bytea AS bytea, ${sql.json(v.jsonb)}::jsonb AS jsonb, ${v.int_array}::int[] AS int_array,
        ${v.text_array}::text[] AS text_array, ${null}::int AS null_int, ${null}::text AS null_text`
      expectEq(plain(r), [want], `round trip #${rep}`)
    }
    const r = await sql`SELECT 9223372036854775807::bigint AS a, (-2147483648)::int AS b, '0.000000000000000000001'::numeric AS c,
      '2000-01-01 00:00:00.001+00'::timestamptz AS d, '\\x00ff'::bytea AS e, ARRAY[[1,2],[3,4]]::int[] AS f,
      ARRAY['x', 'y']::text[] AS g, NULL::uuid AS h, '{"k": [1, null]}'::jsonb AS j`
    expectEq(plain(r), [{
      a: '9223372036854775807', b: -2147483648, c: '0.000000000000000000001', d: new Date(Date.UTC(2000, 0, 1, 0, 0, 0, 1)),
      e: Buffer.from([0, 255]), f: [[1, 2], [3, 4]], g: ['x', 'y'], h: null, j: { k: [1, null] }
    }], 'literal values')
  })
}

async function checkPrepared50x (sql) {
  await gatherClients(CLIENTS, async (i) => {
    await withReserved(sql, async (c) => {
      for (let k = 0; k < 50; k++) {
        let r = await c`SELECT ${k + i * 1000}::int * 2 AS d, ${`c${i}-${k}`}::text AS t`
        expectEq(plain(r), [{ d: (k + i * 1000) * 2, t: `c${i}-${k}` }], 'prepared stmt A')
        r = await c`SELECT ${`c${i}`}::text || '-x' AS x, ${k}::bigint + 1 AS y`
        expectEq(plain(r), [{ x: `c${i}-x`, y: String(k + 1) }], 'prepared stmt B')
        r = await c.unsafe(`SELECT ${k} + $1::int AS s`, [i]) // unprepared, different text each time
        expectEq(plain(r), [{ s: k + i }], 'unprepared statement')
        if (k % 10 === 0) {
          await c.unsafe('BEGIN')
          r = await c`SELECT ${k}::int * 2 AS d, ${'tx'}::text AS t`
          expectEq(plain(r), [{ d: k * 2, t: 'tx' }], 'prepared stmt A in transaction')
          await c.unsafe('COMMIT')
        }
      }
    })
    // and through the pool, where each query may take another connection
    for (let k = 0; k < 50; k++) {
      const r = await sql`SELECT ${k}::int * 2 AS d, ${`p${i}`}::text AS t`
      expectEq(plain(r), [{ d: k * 2, t: `p${i}` }], 'prepared stmt A through the pool')
    }
  })
}

async function checkConcurrent (sql) {
  await gatherClients(CLIENTS, async (i) => {
    for (let k = 0; k < 50; k++) {
      const me = i * 100000 + k
      const r = await sql`SELECT ${me}::int AS me, ${`tag-${me}`}::text AS tag, pg_backend_pid() AS pid`
      expectEq([r[0].me, r[0].tag], [me, `tag-${me}`], 'echo')
    }
  })
}

async function checkCommitRollback (sql, obsSql) {
  const hold = holderSlots()
  await gatherClients(CLIENTS, async (i) => {
    const count = async (s, k) => (await s`SELECT count(*)::int AS n FROM ${sql(S)}.cr WHERE client = ${i} AND k = ${k}`)[0].n
    // the transaction stays open while obsSql needs a server: at most POOL_SIZE - 1 such holders
    // at once (sql.begin rolls back inside the slot on failure)
    await hold.with(() => sql.begin(async (tx) => {
      await tx`INSERT INTO ${sql(S)}.cr VALUES (${i}, 1, 'committed')`
      expectEq(await count(obsSql, 1), 0, 'uncommitted row visible to other connection')
      expectEq(await count(tx, 1), 1, 'own uncommitted row')
    }))
    expectEq(await count(obsSql, 1), 1, 'committed row seen by other connection')
    let err = null
    try {
      await sql.begin(async (tx) => {
        await tx`INSERT INTO ${sql(S)}.cr VALUES (${i}, 2, 'rolled back')`
        expectEq(await count(tx, 2), 1, 'own row before rollback')
        throw new Error('rollback please')
      })
    } catch (e) { err = e }
    expectEq(err && err.message, 'rollback please', 'transaction error')
    expectEq(await count(sql, 2), 0, 'rolled back row')
    expectEq(await count(obsSql, 2), 0, 'rolled back row (other connection)')
    // savepoint rolled back inside a committed transaction
    await sql.begin(async (tx) => {
      await tx`INSERT INTO ${sql(S)}.cr VALUES (${i}, 3, 'outer')`
      await tx.savepoint(async (sp) => { await sp`INSERT INTO ${sql(S)}.cr VALUES (${i}, 4, 'inner')`; throw new Error('sp') }).catch(() => {})
    })
    expectEq([await count(obsSql, 3), await count(obsSql, 4)], [1, 0], 'savepoint rollback')
  })
}

async function checkErrors (sql) {
  await sql`INSERT INTO ${sql(S)}.uniq VALUES (-1)`
  await gatherClients(CLIENTS, async (i) => {
    await withReserved(sql, async (c) => {
      await expectSqlstate(() => c`SELECT 1 / ${0}::int`, '22012', 'division by zero')
      expectEq(plain(await c`SELECT ${i}::int AS x`), [{ x: i }], 'query after 22012')
      await c`INSERT INTO ${sql(S)}.uniq VALUES (${i})`
      await expectSqlstate(() => c`INSERT INTO ${sql(S)}.uniq VALUES (${i})`, '23505', 'unique violation')
      expectEq(plain(await c`SELECT ${`ok${i}`}::text AS x`), [{ x: `ok${i}` }], 'query after 23505')
      await expectSqlstate(() => c.unsafe(`SELECT * FROM ${P}_no_such_table_${i}`), '42P01', 'undefined table')
      await expectSqlstate(() => c.unsafe('SELEC 1'), '42601', 'syntax error')
      expectEq(plain(await c`SELECT 2 AS x`), [{ x: 2 }], 'query after 42P01/42601')
      await c.unsafe('BEGIN')
      await c`INSERT INTO ${sql(S)}.uniq VALUES (${1000 + i})`
      await expectSqlstate(() => c`SELECT 1 / 0`, '22012', 'division by zero in transaction')
      await expectSqlstate(() => c`SELECT 1`, '25P02', 'statement in failed transaction')
      await c.unsafe('ROLLBACK')
      expectEq(plain(await c`SELECT count(*)::int AS n FROM ${sql(S)}.uniq WHERE id = ${1000 + i}`), [{ n: 0 }], 'insert of failed transaction rolled back')
    })
  })
}

async function checkSearchPath (sql) {
  await gatherClients(CLIENTS, async (i) => {
    const [sch, want, osch, other] = i % 2 === 0 ? [SA, 'a', SB, 'b'] : [SB, 'b', SA, 'a']
    await withReserved(sql, async (c) => {
      await c.unsafe(`SET search_path TO ${sch}`)
      for (let k = 0; k < 10; k++) {
        expectEq(plain(await c`SELECT v FROM sp_t`), [{ v: want }], `unqualified query #${k}`)
        await c.unsafe('BEGIN')
        expectEq(plain(await c`SELECT v FROM sp_t WHERE ${1}::int = 1`), [{ v: want }], 'prepared, in a later transaction')
        await c.unsafe('COMMIT')
        await sleep(2)
      }
      expectEq(plain(await c`SHOW search_path`), [{ search_path: sch }], 'SHOW search_path')
      await c.unsafe('BEGIN')
      await c.unsafe(`SET LOCAL search_path TO ${osch}`)
      expectEq(plain(await c.unsafe('SELECT v FROM sp_t')), [{ v: other }], 'SET LOCAL inside')
      await c.unsafe('COMMIT')
      expectEq(plain(await c.unsafe('SELECT v FROM sp_t')), [{ v: want }], 'after SET LOCAL')
      await c.unsafe('RESET search_path')
      await expectSqlstate(() => c.unsafe('SELECT v FROM sp_t'), '42P01', 'after RESET search_path')
    })
  })
}

async function checkTimezone (sql) {
  await gatherClients(CLIENTS, async (i) => {
    const [tz, want] = TZ_EXPECT[i % TZ_EXPECT.length]
    await withReserved(sql, async (c) => {
      await c.unsafe(`SET TimeZone TO '${tz}'`)
      for (let k = 0; k < 10; k++) {
        expectEq(plain(await c`SELECT '2024-01-01 00:00:00+00'::timestamptz::text AS t`), [{ t: want }], `timestamptz text #${k}`)
        await c.unsafe('BEGIN')
        expectEq(plain(await c`SELECT ${'2024-01-01 00:00:00+00'}::timestamptz::text AS t`), [{ t: want }], 'in a later transaction')
        await c.unsafe('COMMIT')
        expectEq(plain(await c.unsafe('SHOW TimeZone')), [{ TimeZone: tz }], 'SHOW TimeZone')
        await sleep(2)
      }
    })
  })
}

async function checkListenNotify (sql) {
  const chan = `${P}_chan`
  const got = []
  let wake = null
  const { unlisten } = await sql.listen(chan, (payload) => { got.push(payload); if (wake) wake() })
  for (let k = 0; k < 5; k++) await sql`SELECT ${k}::int`
  await sql.unsafe(`NOTIFY ${chan}, 'hello-1'`)
  await sql.notify(chan, 'hello-2 é')
  const deadline = Date.now() + 5000
  while (got.length < 2 && Date.now() < deadline) {
    await new Promise((resolve) => { wake = resolve; setTimeout(resolve, 100) })
  }
  expectEq(got, ['hello-1', 'hello-2 é'], 'notifications within 5s')
  await unlisten()
  expectEq(plain(await sql`SELECT 7 AS x`), [{ x: 7 }], 'usable after unlisten')
}

async function checkCopy (sql) {
  const n = 1000
  const rows = []
  for (let i = 1; i <= n; i++) rows.push([i, i % 97 ? copyText(i) : null, i % 5 ? Buffer.from([i % 256, 0, 92, 10]) : null])
  const line = ([i, t, b]) => `${i}\t${copyEsc(t)}\t${copyEsc(b === null ? null : '\\x' + b.toString('hex'))}\n`
  const expected = rows.map(line).join('')
  const w = await sql.unsafe(`COPY ${S}.copy (id, t, b) FROM STDIN`).writable()
  await pipeline(Readable.from(rows.map(line)), w)
  expectEq(plain(await sql`SELECT count(*)::int AS n, sum(id)::int AS s FROM ${sql(S)}.copy`), [{ n, s: n * (n + 1) / 2 }], 'rows after COPY FROM')
  const got = (await sql`SELECT id, t, b FROM ${sql(S)}.copy ORDER BY id`).map((r) => [r.id, r.t, r.b])
  expectEq(got, rows, 'rows as stored')
  const rd = await sql.unsafe(`COPY (SELECT id, t, b FROM ${S}.copy ORDER BY id) TO STDOUT`).readable()
  const chunks = []
  for await (const chunk of rd) chunks.push(chunk)
  const text = Buffer.concat(chunks).toString('utf8')
  expect(text === expected, `COPY TO output differs (got ${text.length} chars, want ${expected.length})`)
  expectEq(plain(await sql`SELECT 1 AS x`), [{ x: 1 }], 'usable after COPY')
}

async function checkCancel (sql) {
  await withReserved(sql, async (c) => {
    for (const inTx of [false, true]) {
      if (inTx) { await c.unsafe('BEGIN'); await c`SELECT 1` }
      const q = c`SELECT pg_sleep(10)`
      let tCancel = 0
      // q.cancel() resolves once the server has closed the cancel connection; wait for it
      // before the next query (a cancel that lands later would hit that query)
      let cancelDone = null
      const timer = setTimeout(() => { tCancel = Date.now(); cancelDone = q.cancel() }, 500)
      let err = null
      try { await q } catch (e) { err = e }
      clearTimeout(timer)
      const took = (Date.now() - tCancel) / 1000
      expect(err, 'pg_sleep(10) was not cancelled')
      expectEq(err.code, '57014', `SQLSTATE (${err.message})`)
      expect(tCancel, `query failed with ${err.code} before the cancel was sent (inTx=${inTx})`)
      expect(took < 2, `cancel took ${took}s`)
      await withDeadline(cancelDone, 5000, 'cancel connection close')
      if (inTx) await c.unsafe('ROLLBACK')
      expectEq(plain(await c`SELECT ${42}::int AS x`), [{ x: 42 }], 'connection usable after cancel')
    }
  })
}

async function checkBigResult (sql) {
  const want = bigExpectedDigest()
  const rows = await sql`SELECT g, md5(g::text) AS m FROM generate_series(1, ${BIG_N}::int) g`
  expectEq(rows.length, BIG_N, 'row count')
  const h = crypto.createHash('md5')
  for (let n = 0; n < rows.length; n++) {
    if (rows[n].g !== n + 1) throw new Error(`row ${n + 1} has g=${rows[n].g}`)
    h.update(rows[n].m)
  }
  expectEq(h.digest('hex'), want, 'md5 checksum')
  // streamed with a cursor in batches
  let n = 0
  await sql`SELECT g FROM generate_series(1, ${BIG_N}::int) g`.cursor(10000, (batch) => {
    for (const r of batch) { n++; if (r.g !== n) throw new Error(`cursor row ${n} has g=${r.g}`) }
  })
  expectEq(n, BIG_N, 'cursor row count')
}

async function checkPipelining () {
  // postgres.js pipelines concurrent queries on one connection: 20 one-connection instances,
  // each firing 100 queries at once
  await gatherClients(CLIENTS, async (i) => {
    const one = newSql({ max: 1 })
    try {
      const ps = []
      for (let k = 0; k < 100; k++) {
        if (k % 2 === 0) ps.push(one`INSERT INTO ${one(S)}.pl VALUES (${i}, ${k}, ${`v${i}-${k}`})`)
        else ps.push(one`SELECT ${i * 1000 + k}::int AS a, ${`p${i}-${k}`}::text AS b`)
      }
      const res = await Promise.all(ps)
      for (let k = 1; k < 100; k += 2) expectEq(plain(res[k]), [{ a: i * 1000 + k, b: `p${i}-${k}` }], `pipelined select ${k}`)
      const r = await one`SELECT count(*)::int AS n, min(k) AS lo, max(k) AS hi FROM ${one(S)}.pl WHERE client = ${i}`
      expectEq(plain(r), [{ n: 50, lo: 0, hi: 98 }], 'pipelined inserts')
      const [e1, ok2] = await Promise.allSettled([one`SELECT 1 / ${0}::int`, one`SELECT ${i}::int AS x`])
      expectEq(e1.status === 'rejected' && e1.reason.code, '22012', 'pipelined error SQLSTATE')
      expectEq(ok2.status === 'fulfilled' && plain(ok2.value), [{ x: i }], 'query after pipelined error')
    } finally { await one.end({ timeout: 5 }) }
  })
}

async function main () {
  const rep = new Reporter(DRIVER)
  const sql = newSql({ max: CLIENTS })
  const obsSql = newSql({ max: CLIENTS })
  try {
    await setup(sql)
  } catch (e) {
    rep.fail('setup', e.message)
    return rep.finish()
  }
  try {
    await rep.run('types', () => checkTypes(sql))
    await rep.run('prepared_50x', () => checkPrepared50x(sql))
    await rep.run('concurrent_own_answers', () => checkConcurrent(sql))
    await rep.run('commit_rollback', () => checkCommitRollback(sql, obsSql))
    await rep.run('errors_sqlstate', () => checkErrors(sql))
    await rep.run('search_path', () => checkSearchPath(sql))
    await rep.run('timezone', () => checkTimezone(sql))
    await rep.run('listen_notify', () => checkListenNotify(sql))
    await rep.run('copy', () => checkCopy(sql))
    await rep.run('cancel', () => checkCancel(sql))
    await rep.run('big_result', () => checkBigResult(sql))
    await rep.run('pipelining', checkPipelining)
  } finally {
    try { await cleanup(sql) } catch (e) { rep.fail('cleanup', e.message) }
    await Promise.all(instances.map((s) => s.end({ timeout: 5 }).catch(() => {})))
    rep.finish()
  }
}

main()
