//! Talking to the leader's server connection directly (not through the relay): learning a shape's key type
//! once (Parse + Describe statement), and running one merged statement, its rows routed by ordinal.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::wire::{self, Fetched};
use crate::backend::ServerConn;
use crate::error::{Error, Result};
use crate::protocol::codes::*;
use crate::protocol::encode::put_msg;
use crate::protocol::frame::complete_len;
use crate::protocol::message::put_statement_target;
use crate::sql::BatchShape;
use crate::state::statements::{Learned, Ready};
use crate::state::Registry;

/// One whole frame from the server (header included), without copying it.
pub async fn frame(conn: &mut ServerConn) -> Result<BytesMut> {
    use tokio::io::AsyncReadExt;
    loop {
        let n = complete_len(&conn.rbuf, crate::backend::server::MAX_SERVER_MESSAGE).map_err(|e| Error::UpstreamLost(e.to_string()))?;
        if let Some(n) = n {
            return Ok(conn.rbuf.split_to(n));
        }
        let r = conn.stream.read_buf(&mut conn.rbuf).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
        if r == 0 {
            return Err(Error::UpstreamLost("server closed the connection".into()));
        }
    }
}

/// Asks the server for the statement's parameter and result columns. `Unknown` if the statement fails
/// here (it may not later: the table may not exist yet); the caller then lets every lookup run alone.
pub async fn learn(conn: &mut ServerConn, registry: &Registry, shape: &BatchShape, sql: &[u8], types: &[u8]) -> Result<Learned> {
    let mut out = BytesMut::with_capacity(sql.len() + types.len() + 32);
    put_msg(&mut out, PARSE, |b| {
        b.put_u8(0);
        b.put_slice(sql);
        b.put_u8(0);
        b.put_slice(types);
    });
    put_msg(&mut out, DESCRIBE, |b| b.put_slice(b"S\0"));
    put_msg(&mut out, SYNC, |_| {});
    conn.send(&out).await?;
    let (mut params, mut ncols, mut failed) = (None, None, false);
    loop {
        let f = frame(conn).await?;
        match f[0] {
            PARAMETER_DESCRIPTION => {
                let b = &f[5..];
                if b.len() >= 2 {
                    let n = i16::from_be_bytes([b[0], b[1]]);
                    params = (n == 1 && b.len() == 6).then(|| u32::from_be_bytes([b[2], b[3], b[4], b[5]]));
                }
            }
            ROW_DESCRIPTION if f.len() >= 7 => ncols = Some(i16::from_be_bytes([f[5], f[6]]).max(0) as usize),
            ERROR_RESPONSE => failed = true,
            READY_FOR_QUERY => break,
            _ => {}
        }
    }
    if failed {
        return Ok(Learned::Unknown);
    }
    let (Some(oid), Some(ncols)) = (params, ncols) else { return Ok(Learned::Never) };
    let Some(ty) = crate::sql::array_cast_type(oid) else { return Ok(Learned::Never) };
    let merged = registry.intern(shape.merged_sql(ty).as_bytes(), &[0, 0]);
    Ok(Learned::Ready(Arc::new(Ready { elem_oid: oid, ncols, merged })))
}

/// Runs the merged statement for `keys` (distinct raw parameters, in the lookups' own format) on `conn`.
/// `Ok(None)` if Postgres refused it (each lookup should then run alone); the connection is at
/// ReadyForQuery either way.
pub async fn execute(
    conn: &mut ServerConn,
    ready: &Ready,
    param_format: i16,
    keys: &[Option<bytes::Bytes>],
    formats: &[i16],
) -> Result<Option<Fetched>> {
    let array = if param_format == 1 { wire::binary_array(keys, ready.elem_oid) } else { wire::text_array(keys) };
    let stmt = &ready.merged;
    let mut out = BytesMut::with_capacity(array.len() + stmt.parse.len() + 64);
    let mut parsing = false;
    if conn.prepared.get(&stmt.id).is_none() {
        if let Some((_, evicted)) = conn.prepared.push(stmt.id, stmt.server_name.clone()) {
            if evicted != stmt.server_name {
                put_statement_target(&mut out, CLOSE, evicted.as_bytes());
            }
        }
        out.put_slice(&stmt.parse);
        parsing = true;
    }
    wire::put_merged_bind(&mut out, &stmt.server_name, param_format, &array, formats);
    put_msg(&mut out, DESCRIBE, |b| b.put_slice(b"P\0"));
    put_msg(&mut out, EXECUTE, |b| b.put_slice(&[0, 0, 0, 0, 0]));
    put_msg(&mut out, SYNC, |_| {});
    conn.send(&out).await?;

    let mut fetched = Fetched { row_description: bytes::Bytes::new(), rows: (0..keys.len()).map(|_| (BytesMut::new(), 0)).collect() };
    let (mut failed, mut parsed) = (false, false);
    loop {
        let f = frame(conn).await?;
        match f[0] {
            PARSE_COMPLETE => parsed = true,
            ROW_DESCRIPTION if !failed => match wire::strip_row_description(&f) {
                Some(t) => fetched.row_description = t,
                None => failed = true,
            },
            DATA_ROW if !failed => {
                // Append straight into the row list of the key the ordinal names.
                let ord = data_row_ordinal(&f).filter(|o| (1..=keys.len() as u64).contains(o));
                match ord {
                    Some(o) => {
                        let (rows, n) = &mut fetched.rows[o as usize - 1];
                        wire::strip_data_row(&f, rows);
                        *n += 1;
                    }
                    None => failed = true,
                }
            }
            ERROR_RESPONSE => failed = true,
            READY_FOR_QUERY => break,
            _ => {} // BindComplete, CommandComplete, CloseComplete, notices
        }
    }
    if parsing && !parsed {
        conn.prepared.pop(&stmt.id);
    }
    Ok((!failed).then_some(fetched))
}

fn data_row_ordinal(f: &[u8]) -> Option<u64> {
    let n = f.len();
    (n >= 19 && f[n - 12..n - 8] == [0, 0, 0, 8]).then(|| u64::from_be_bytes(f[n - 8..].try_into().unwrap_or_default()))
}
