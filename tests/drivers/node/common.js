'use strict'
// Shared helpers for the Node driver checks: reporting, deadlines, test data.
// Every check prints exactly one line: "PASS <driver>/<check> (<secs>s)" or
// "FAIL <driver>/<check>: <reason>"; tests/drivers/run.sh counts those lines.
const crypto = require('crypto')
const assert = require('assert')

const CLIENTS = 20
const CHECK_DEADLINE_MS = 40000
const BIG_N = 200000
const TZ_EXPECT = [
  ['UTC', '2024-01-01 00:00:00+00'],
  ['Asia/Kolkata', '2024-01-01 05:30:00+05:30'],
  ['America/New_York', '2023-12-31 19:00:00-05'],
  ['Pacific/Chatham', '2024-01-01 13:45:00+13:45'],
  ['Europe/Berlin', '2024-01-01 01:00:00+01'],
  ['Asia/Tokyo', '2024-01-01 09:00:00+09']
]

function runPrefix (driver) {
  return driver + '_' + crypto.randomBytes(4).toString('hex')
}

function copyText (i) {
  return `row ${i}\tcol\\x "q" 'a' é€ line\nnext ${i * 7}`
}

// COPY text-format escaping of one field
function copyEsc (v) {
  if (v === null) return '\\N'
  return String(v).replace(/\\/g, '\\\\').replace(/\t/g, '\\t').replace(/\n/g, '\\n').replace(/\r/g, '\\r')
}

function typeValues (i) {
  return {
    int: -2147483000 + i,
    bigint: (9007199254740993n + BigInt(i) * 1000003n).toString(), // above 2**53
    numeric: `-12345678901234567890.${String(i).padStart(2, '0')}00000000000000000001`,
    text: `client ${i}: héllo 'wörld' "q" \\ \t tab € 😀`,
    timestamptz: new Date(Date.UTC(2024, 1, 29, 12, 34, 56, 123 + i)),
    uuid: '12345678-9abc-4def-8123-4567' + (0x89abcdef + i).toString(16).padStart(8, '0'),
    bytea: Buffer.concat([Buffer.from([...Array(256).keys()]), Buffer.from([i, 0, 92])]),
    jsonb: { client: i, nested: { a: [1, 2.5, null, true, 'x'] }, s: 'é"\n' },
    int_array: [1, -2, null, 2147483647, i],
    text_array: ['a', 'b,c', '{brace}', '"quote"', null, 'NULL', '', `c${i}`]
  }
}

function bigExpectedDigest () {
  const h = crypto.createHash('md5')
  for (let g = 1; g <= BIG_N; g++) h.update(crypto.createHash('md5').update(String(g)).digest('hex'))
  return h.digest('hex')
}

function expectEq (got, want, what) {
  try {
    assert.deepStrictEqual(got, want)
  } catch (e) {
    // point at the first differing field of row objects/arrays to keep messages short
    if (got && want && typeof got === 'object' && typeof want === 'object' && !Buffer.isBuffer(want) && !(want instanceof Date)) {
      for (const k of new Set([...Object.keys(want), ...Object.keys(got)])) {
        try { assert.deepStrictEqual(got[k], want[k]) } catch (_) { expectEq(got[k], want[k], `${what}[${k}]`) }
      }
    }
    const show = (x) => { try { return JSON.stringify(x, (k, v) => typeof v === 'bigint' ? v.toString() + 'n' : v) } catch (_) { return String(x) } }
    throw new Error(`${what}: got ${show(got)}, want ${show(want)}`)
  }
}

function expect (cond, what) { if (!cond) throw new Error(what) }

async function expectSqlstate (promiseFn, want, what) {
  let err = null
  try { await promiseFn() } catch (e) { err = e }
  if (!err) throw new Error(`${what}: succeeded, expected SQLSTATE ${want}`)
  expectEq(err.code, want, `${what}: SQLSTATE (message: ${err.message})`)
}

async function gatherClients (n, fn) {
  const res = await Promise.allSettled([...Array(n).keys()].map((i) => fn(i)))
  const errs = res.map((r, i) => r.status === 'rejected' ? `client ${i}: ${r.reason && r.reason.message}` : null).filter(Boolean)
  if (errs.length) throw new Error(`${errs.length} of ${n} clients failed, first: ${errs[0]}`)
}

// Server connections of the pooler under test (transaction mode). A client that holds a
// transaction open keeps one server connection; if it then needs a second connection of its own
// (an observer checking what other sessions see), 20 such clients at once hold every server and
// all observers wait forever: a deadlock by construction under any transaction pooler. Those
// sections run with at most POOL_SIZE - 1 holders at once (one against Postgres directly too),
// so a server is always left for observers; the rest of each check stays concurrent.
const POOL_SIZE = parseInt(process.env.POOL_SIZE || '2', 10)
const HOLDERS = Math.max(1, POOL_SIZE - 1)

class Semaphore {
  constructor (n) { this.n = n; this.waiting = [] }
  async acquire () {
    if (this.n > 0) { this.n--; return }
    await new Promise((resolve) => this.waiting.push(resolve))
  }

  release () {
    const next = this.waiting.shift()
    if (next) next(); else this.n++
  }

  // runs fn while holding a slot; roll the transaction back inside fn on failure
  async with (fn) {
    await this.acquire()
    try { return await fn() } finally { this.release() }
  }
}

const holderSlots = () => new Semaphore(HOLDERS)

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function withDeadline (p, ms, what) {
  let t
  return Promise.race([p, new Promise((resolve, reject) => { t = setTimeout(() => reject(new Error(`${what}: deadline of ${ms / 1000}s exceeded`)), ms) })])
    .finally(() => clearTimeout(t))
}

class Reporter {
  constructor (driver) { this.driver = driver; this.passed = 0; this.failed = 0 }
  ok (name, secs) { this.passed++; console.log(`PASS ${this.driver}/${name} (${secs.toFixed(2)}s)`) }
  fail (name, reason) {
    this.failed++
    const r = String(reason).split(/\s+/).join(' ').slice(0, 600)
    console.log(`FAIL ${this.driver}/${name}: ${r}`)
    if (process.env.DRIVERS_VERBOSE && reason && reason.stack) console.error(reason.stack)
  }

  async run (name, fn, ms = CHECK_DEADLINE_MS) {
    const t0 = Date.now()
    try {
      await withDeadline(Promise.resolve().then(fn), ms, 'check')
      this.ok(name, (Date.now() - t0) / 1000)
    } catch (e) {
      this.fail(name, e && e.message ? e.message : e)
      if (process.env.DRIVERS_VERBOSE && e && e.stack) console.error(e.stack)
    }
  }

  finish () {
    console.log(`# ${this.driver}: ${this.passed} passed, ${this.failed} failed`)
    // sockets of timed-out checks may keep the loop alive: leave hard once stdout is flushed
    process.stdout.write('', () => process.exit(this.failed ? 1 : 0))
  }
}

module.exports = {
  CLIENTS, CHECK_DEADLINE_MS, BIG_N, TZ_EXPECT, runPrefix, copyText, copyEsc, typeValues, bigExpectedDigest,
  expectEq, expect, expectSqlstate, gatherClients, sleep, withDeadline, Reporter, POOL_SIZE, HOLDERS, holderSlots
}
