'use strict'
// node-postgres (`pg`) checks: pg.Pool of 20, named prepared statements, COPY via pg-copy-streams,
// cancellation through Client#cancel, pipeline mode.   Usage: node pg_check.js URL
const crypto = require('crypto')
const { Readable } = require('stream')
const { pipeline } = require('stream/promises')
const pg = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const {
  CLIENTS, BIG_N, TZ_EXPECT, runPrefix, copyText, copyEsc, typeValues, bigExpectedDigest,
  expectEq, expect, expectSqlstate, gatherClients, sleep, withDeadline, Reporter, holderSlots
} = require('./common')

const URL = process.argv[2]
const DRIVER = 'pg'
const P = runPrefix('nodepg')
const S = P
const SA = P + '_sa'
const SB = P + '_sb'
const cfg = { connectionString: URL, connectionTimeoutMillis: 10000 }

async function connect (extra = {}) {
  const c = new pg.Client({ ...cfg, ...extra })
  c.on('error', () => {}) // reported through the failing query instead
  await c.connect()
  return c
}

async function withClient (fn, extra) {
  const c = await connect(extra)
  try { return await fn(c) } finally { await c.end().catch(() => {}) }
}

// a pg.Pool checkout for fn; if fn fails (perhaps inside BEGIN), the client is destroyed rather
// than returned to the pool, so a later check never gets a connection left in a transaction
async function withPoolClient (pool, fn) {
  const c = await pool.connect()
  let failure
  try { return await fn(c) } catch (e) { failure = e; throw e } finally { c.release(failure || undefined) }
}

async function setup () {
  await withClient(async (c) => {
    await c.query(`CREATE SCHEMA ${S}`)
    await c.query(`CREATE TABLE ${S}.cr (client int, k int, v text)`)
    await c.query(`CREATE TABLE ${S}.uniq (id int PRIMARY KEY)`)
    await c.query(`CREATE TABLE ${S}.copy (id int PRIMARY KEY, t text, b bytea)`)
    await c.query(`CREATE TABLE ${S}.pl (client int, k int, v text)`)
    for (const [sch, val] of [[SA, 'a'], [SB, 'b']]) {
      await c.query(`CREATE SCHEMA ${sch}`)
      await c.query(`CREATE TABLE ${sch}.sp_t (v text)`)
      await c.query(`INSERT INTO ${sch}.sp_t VALUES ($1)`, [val])
    }
  })
}

async function cleanup () {
  await withClient(async (c) => {
    for (const sch of [S, SA, SB]) await c.query(`DROP SCHEMA IF EXISTS ${sch} CASCADE`)
  })
}

const TYPE_SQL = 'SELECT $1::int AS int, $2::bigint AS bigint, $3::numeric AS numeric, $4::text AS text,' +
  ' $5::timestamptz AS timestamptz, $6::uuid AS uuid, $7::bytea AS bytea, $8::jsonb AS jsonb,' +
  ' $9::int[] AS int_array, $10::text[] AS text_array, $11::int AS null_int, $12::text AS null_text'

async function checkTypes (pool) {
  await gatherClients(CLIENTS, async (i) => {
    const v = typeValues(i)
    const params = [v.int, v.bigint, v.numeric, v.text, v.timestamptz, v.uuid, v.bytea, JSON.stringify(v.jsonb),
      v.int_array, v.text_array, null, null]
    const want = { ...v, null_int: null, null_text: null }
    for (const name of [undefined, `types_${i % 3}`]) {
      for (let rep = 0; rep < 2; rep++) {
        const r = await pool.query({ text: TYPE_SQL, values: params, name })
        expectEq(r.rows.length, 1, 'row count')
        expectEq(r.rows[0], want, `round trip (name=${name})`)
      }
    }
    const r = await pool.query("SELECT 9223372036854775807::bigint AS a, (-2147483648)::int AS b, '0.000000000000000000001'::numeric AS c," +
      " '2000-01-01 00:00:00.001+00'::timestamptz AS d, '\\x00ff'::bytea AS e, ARRAY[[1,2],[3,4]]::int[] AS f," +
      " ARRAY['x', NULL]::text[] AS g, NULL::uuid AS h, '{\"k\": [1, null]}'::jsonb AS j")
    expectEq(r.rows[0], {
      a: '9223372036854775807', b: -2147483648, c: '0.000000000000000000001', d: new Date(Date.UTC(2000, 0, 1, 0, 0, 0, 1)),
      e: Buffer.from([0, 255]), f: [[1, 2], [3, 4]], g: ['x', null], h: null, j: { k: [1, null] }
    }, 'literal values')
  })
}

async function checkPrepared50x (pool) {
  await gatherClients(CLIENTS, async (i) => {
    await withPoolClient(pool, async (c) => {
      for (let k = 0; k < 50; k++) {
        let r = await c.query({ name: 'stmt_a', text: 'SELECT $1::int * 2 AS d, $2::text AS t', values: [k + i * 1000, `c${i}-${k}`] })
        expectEq(r.rows, [{ d: (k + i * 1000) * 2, t: `c${i}-${k}` }], 'prepared stmt A')
        r = await c.query({ name: 'stmt_b', text: "SELECT $1::text || '-x' AS x, $2::bigint + 1 AS y", values: [`c${i}`, k] })
        expectEq(r.rows, [{ x: `c${i}-x`, y: String(k + 1) }], 'prepared stmt B')
        r = await c.query(`SELECT ${k} + $1::int AS s`, [i])
        expectEq(r.rows, [{ s: k + i }], 'unnamed statement')
        if (k % 10 === 0) {
          await c.query('BEGIN')
          r = await c.query({ name: 'stmt_a', text: 'SELECT $1::int * 2 AS d, $2::text AS t', values: [k, 'tx'] })
          expectEq(r.rows, [{ d: k * 2, t: 'tx' }], 'prepared stmt A in transaction')
          await c.query('COMMIT')
        }
      }
      expect(c.connection.parsedStatements.stmt_a, 'pg did not keep stmt_a prepared')
    })
  })
}

async function checkConcurrent (pool) {
  await gatherClients(CLIENTS, async (i) => {
    for (let k = 0; k < 50; k++) {
      const me = i * 100000 + k
      const r = await pool.query({ text: 'SELECT $1::int AS me, $2::text AS tag, pg_backend_pid() AS pid', values: [me, `tag-${me}`], name: k % 2 ? 'echo' : undefined })
      expectEq([r.rows[0].me, r.rows[0].tag], [me, `tag-${me}`], 'echo')
    }
  })
}

async function checkCommitRollback (pool) {
  // c holds its transaction open while obs needs a server: at most POOL_SIZE - 1 such holders at
  // once, or every server of a transaction pooler is held and every observer waits
  const hold = holderSlots()
  await gatherClients(CLIENTS, async (i) => {
    const obs = await connect() // observer outside the pool: 20 clients x 2 would starve a pool of 20
    const count = async (conn, k) => (await conn.query(`SELECT count(*)::int AS n FROM ${S}.cr WHERE client = $1 AND k = $2`, [i, k])).rows[0].n
    try {
      await withPoolClient(pool, async (c) => {
        await hold.with(async () => {
          await c.query('BEGIN')
          try {
            await c.query(`INSERT INTO ${S}.cr VALUES ($1, 1, 'committed')`, [i])
            expectEq(await count(obs, 1), 0, 'uncommitted row visible to other connection')
            expectEq(await count(c, 1), 1, 'own uncommitted row')
          } catch (e) {
            await c.query('ROLLBACK').catch(() => {}) // inside the slot: its server is free on release
            throw e
          }
          await c.query('COMMIT')
        })
        expectEq(await count(obs, 1), 1, 'committed row seen by other connection')
        await c.query('BEGIN')
        await c.query(`INSERT INTO ${S}.cr VALUES ($1, 2, 'rolled back')`, [i])
        expectEq(await count(c, 2), 1, 'own row before rollback')
        await c.query('ROLLBACK')
        expectEq(await count(c, 2), 0, 'rolled back row')
        expectEq(await count(obs, 2), 0, 'rolled back row (other connection)')
      })
    } finally { await obs.end().catch(() => {}) }
  })
}

async function checkErrors (pool) {
  await pool.query(`INSERT INTO ${S}.uniq VALUES (-1)`)
  await gatherClients(CLIENTS, async (i) => {
    await withPoolClient(pool, async (c) => {
      await expectSqlstate(() => c.query('SELECT 1 / $1::int', [0]), '22012', 'division by zero')
      expectEq((await c.query('SELECT $1::int AS x', [i])).rows, [{ x: i }], 'query after 22012')
      await c.query(`INSERT INTO ${S}.uniq VALUES ($1)`, [i])
      await expectSqlstate(() => c.query({ name: 'ins_uniq', text: `INSERT INTO ${S}.uniq VALUES ($1)`, values: [i] }), '23505', 'unique violation')
      expectEq((await c.query('SELECT $1::text AS x', [`ok${i}`])).rows, [{ x: `ok${i}` }], 'query after 23505')
      await expectSqlstate(() => c.query(`SELECT * FROM ${P}_no_such_table_${i}`), '42P01', 'undefined table')
      await expectSqlstate(() => c.query('SELEC 1'), '42601', 'syntax error')
      expectEq((await c.query('SELECT 2 AS x')).rows, [{ x: 2 }], 'query after 42P01/42601')
      await c.query('BEGIN')
      await c.query(`INSERT INTO ${S}.uniq VALUES ($1)`, [1000 + i])
      await expectSqlstate(() => c.query('SELECT 1 / 0'), '22012', 'division by zero in transaction')
      await expectSqlstate(() => c.query('SELECT 1'), '25P02', 'statement in failed transaction')
      await c.query('ROLLBACK')
      expectEq((await c.query(`SELECT count(*)::int AS n FROM ${S}.uniq WHERE id = $1`, [1000 + i])).rows, [{ n: 0 }], 'insert of failed transaction rolled back')
    })
  })
}

async function checkSearchPath () {
  await gatherClients(CLIENTS, async (i) => {
    const [sch, want, osch, other] = i % 2 === 0 ? [SA, 'a', SB, 'b'] : [SB, 'b', SA, 'a']
    await withClient(async (c) => {
      await c.query(`SET search_path TO ${sch}`)
      for (let k = 0; k < 10; k++) {
        expectEq((await c.query('SELECT v FROM sp_t')).rows, [{ v: want }], `unqualified query #${k}`)
        await c.query('BEGIN')
        expectEq((await c.query({ name: 'sp', text: 'SELECT v FROM sp_t WHERE $1::int = 1', values: [1] })).rows, [{ v: want }], 'prepared, in a later transaction')
        await c.query('COMMIT')
        await sleep(2)
      }
      expectEq((await c.query('SHOW search_path')).rows, [{ search_path: sch }], 'SHOW search_path')
      await c.query('BEGIN')
      await c.query(`SET LOCAL search_path TO ${osch}`)
      expectEq((await c.query('SELECT v FROM sp_t')).rows, [{ v: other }], 'SET LOCAL inside')
      await c.query('COMMIT')
      expectEq((await c.query('SELECT v FROM sp_t')).rows, [{ v: want }], 'after SET LOCAL')
      await c.query('RESET search_path')
      await expectSqlstate(() => c.query('SELECT v FROM sp_t'), '42P01', 'after RESET search_path')
    })
  })
}

async function checkTimezone () {
  await gatherClients(CLIENTS, async (i) => {
    const [tz, want] = TZ_EXPECT[i % TZ_EXPECT.length]
    await withClient(async (c) => {
      await c.query(`SET TimeZone TO '${tz}'`)
      for (let k = 0; k < 10; k++) {
        expectEq((await c.query("SELECT '2024-01-01 00:00:00+00'::timestamptz::text AS t")).rows, [{ t: want }], `timestamptz text #${k}`)
        await c.query('BEGIN')
        expectEq((await c.query({ name: 'tz', text: 'SELECT $1::timestamptz::text AS t', values: ['2024-01-01 00:00:00+00'] })).rows, [{ t: want }], 'in a later transaction')
        await c.query('COMMIT')
        expectEq((await c.query('SHOW TimeZone')).rows, [{ TimeZone: tz }], 'SHOW TimeZone')
        await sleep(2)
      }
    })
  })
}

async function checkListenNotify () {
  const chan = `${P}_chan`
  const listener = await connect()
  const notifier = await connect()
  try {
    const got = []
    let wake = null
    listener.on('notification', (n) => { got.push([n.channel, n.payload]); if (wake) wake() })
    await listener.query(`LISTEN ${chan}`)
    for (let k = 0; k < 5; k++) {
      await notifier.query('SELECT $1::int', [k])
      await listener.query('SELECT $1::int', [k])
    }
    await notifier.query(`NOTIFY ${chan}, 'hello-1'`)
    await notifier.query('SELECT pg_notify($1, $2)', [chan, 'hello-2 é'])
    const deadline = Date.now() + 5000
    while (got.length < 2 && Date.now() < deadline) {
      await new Promise((resolve) => { wake = resolve; setTimeout(resolve, 100) })
    }
    expectEq(got, [[chan, 'hello-1'], [chan, 'hello-2 é']], 'notifications within 5s')
    await listener.query(`UNLISTEN ${chan}`)
    expectEq((await listener.query('SELECT 7 AS x')).rows, [{ x: 7 }], 'listener usable')
  } finally {
    await listener.end().catch(() => {})
    await notifier.end().catch(() => {})
  }
}

async function checkCopy () {
  const n = 1000
  const rows = []
  for (let i = 1; i <= n; i++) rows.push([i, i % 97 ? copyText(i) : null, i % 5 ? Buffer.from([i % 256, 0, 92, 10]) : null])
  const line = ([i, t, b]) => `${i}\t${copyEsc(t)}\t${copyEsc(b === null ? null : '\\x' + b.toString('hex'))}\n`
  const expected = rows.map(line).join('')
  await withClient(async (c) => {
    const ins = c.query(copyFrom(`COPY ${S}.copy (id, t, b) FROM STDIN`))
    await pipeline(Readable.from(rows.map(line)), ins)
    expectEq(ins.rowCount, n, 'COPY FROM rowCount')
    expectEq((await c.query(`SELECT count(*)::int AS n, sum(id)::int AS s FROM ${S}.copy`)).rows, [{ n, s: n * (n + 1) / 2 }], 'rows after COPY FROM')
    const got = (await c.query(`SELECT id, t, b FROM ${S}.copy ORDER BY id`)).rows.map((r) => [r.id, r.t, r.b])
    expectEq(got, rows, 'rows as stored')
    const chunks = []
    const out = c.query(copyTo(`COPY (SELECT id, t, b FROM ${S}.copy ORDER BY id) TO STDOUT`))
    for await (const chunk of out) chunks.push(chunk)
    const text = Buffer.concat(chunks).toString('utf8')
    expect(text === expected, `COPY TO output differs (got ${text.length} chars, want ${expected.length})`)
    expectEq((await c.query('SELECT 1 AS x')).rows, [{ x: 1 }], 'connection usable after COPY')
  })
}

async function checkCancel () {
  await withClient(async (c) => {
    for (const inTx of [false, true]) {
      if (inTx) { await c.query('BEGIN'); await c.query('SELECT 1') }
      let tCancel = 0
      const t0 = Date.now()
      // node-pg's cancel is fire-and-forget: the server closes the cancel connection once it has
      // signalled the backend, so wait for that close before the next query (the same as
      // psycopg's cancel_safe or pgJDBC do); a cancel that lands later hits the next query
      let cancelDone = null
      const timer = setTimeout(() => {
        tCancel = Date.now()
        const canceller = new pg.Client(cfg)
        cancelDone = new Promise((resolve) => {
          canceller.connection.once('end', resolve)
          canceller.connection.once('error', resolve)
        })
        canceller.cancel(c, c._getActiveQuery ? c._getActiveQuery() : c.activeQuery)
      }, 500)
      let err = null
      try { await c.query('SELECT pg_sleep(10)') } catch (e) { err = e }
      clearTimeout(timer)
      const took = (Date.now() - tCancel) / 1000
      expect(err, 'pg_sleep(10) was not cancelled')
      expectEq(err.code, '57014', `SQLSTATE (${err.message})`)
      expect(tCancel, `query failed with ${err.code} before the cancel was sent (inTx=${inTx}, after ${(Date.now() - t0) / 1000}s)`)
      expect(took < 2, `cancel took ${took}s`)
      await withDeadline(cancelDone, 5000, 'cancel connection close')
      if (inTx) await c.query('ROLLBACK')
      expectEq((await c.query('SELECT $1::int AS x', [42])).rows, [{ x: 42 }], 'connection usable after cancel')
    }
  })
}

async function checkBigResult (pool) {
  const want = bigExpectedDigest()
  const r = await pool.query('SELECT g, md5(g::text) AS m FROM generate_series(1, $1) g', [BIG_N])
  expectEq(r.rows.length, BIG_N, 'row count')
  const h = crypto.createHash('md5')
  for (let n = 0; n < r.rows.length; n++) {
    if (r.rows[n].g !== n + 1) throw new Error(`row ${n + 1} has g=${r.rows[n].g}`)
    h.update(r.rows[n].m)
  }
  expectEq(h.digest('hex'), want, 'md5 checksum')
  // the same in array row mode
  const r2 = await pool.query({ text: 'SELECT sum(g)::bigint AS s FROM generate_series(1, $1) g', values: [BIG_N] })
  expectEq(r2.rows[0].s, String(BIG_N * (BIG_N + 1) / 2), 'sum')
}

async function checkPipeline () {
  // pg's pipeline mode: all queries of a client are written before the first answer is read
  await gatherClients(CLIENTS, async (i) => {
    await withClient(async (c) => {
      const ps = []
      for (let k = 0; k < 100; k++) {
        if (k % 2 === 0) ps.push(c.query(`INSERT INTO ${S}.pl VALUES ($1, $2, $3)`, [i, k, `v${i}-${k}`]))
        else ps.push(c.query({ name: k % 3 === 0 ? 'pl_sel' : undefined, text: 'SELECT $1::int AS a, $2::text AS b', values: [i * 1000 + k, `p${i}-${k}`] }))
      }
      const res = await Promise.all(ps)
      for (let k = 1; k < 100; k += 2) expectEq(res[k].rows, [{ a: i * 1000 + k, b: `p${i}-${k}` }], `pipelined select ${k}`)
      const r = await c.query(`SELECT count(*)::int AS n, min(k) AS lo, max(k) AS hi FROM ${S}.pl WHERE client = $1`, [i])
      expectEq(r.rows, [{ n: 50, lo: 0, hi: 98 }], 'pipelined inserts')
      // an error in the middle fails only its own query
      const [e1, ok2] = await Promise.allSettled([c.query('SELECT 1 / 0'), c.query('SELECT $1::int AS x', [i])])
      expectEq(e1.status === 'rejected' && e1.reason.code, '22012', 'pipelined error SQLSTATE')
      expectEq(ok2.status === 'fulfilled' && ok2.value.rows, [{ x: i }], 'query after pipelined error')
    }, { pipeline: true })
  })
}

async function main () {
  const rep = new Reporter(DRIVER)
  let pool
  try {
    await setup()
    pool = new pg.Pool({ ...cfg, max: CLIENTS })
    pool.on('error', () => {})
  } catch (e) {
    rep.fail('setup', e.message)
    return rep.finish()
  }
  try {
    await rep.run('types', () => checkTypes(pool))
    await rep.run('prepared_50x', () => checkPrepared50x(pool))
    await rep.run('concurrent_own_answers', () => checkConcurrent(pool))
    await rep.run('commit_rollback', () => checkCommitRollback(pool))
    await rep.run('errors_sqlstate', () => checkErrors(pool))
    await rep.run('search_path', checkSearchPath)
    await rep.run('timezone', checkTimezone)
    await rep.run('listen_notify', checkListenNotify)
    await rep.run('copy', checkCopy)
    await rep.run('cancel', checkCancel)
    await rep.run('big_result', () => checkBigResult(pool))
    await rep.run('pipeline', checkPipeline)
    await rep.run('pool_end', () => pool.end(), 10000)
  } finally {
    try { await cleanup() } catch (e) { rep.fail('cleanup', e.message) }
    rep.finish()
  }
}

main()
