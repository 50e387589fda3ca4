//! The sample database (roles, authors/books/orders with ~100k rows) and the monitor that asks Postgres how
//! many queries it executed and how many connections it holds.

use tokio_postgres::{Client, NoTls};

use super::cluster::Cluster;
use super::measure::describe;

/// The application role and database (password = name).
pub const APP: &str = "demo";
/// The noisy neighbour of workload 5 (password = name).
pub const FLOOD: &str = "flood";

pub const AUTHORS: i64 = 1_000;
pub const BOOKS: i64 = 50_000;
pub const ORDERS: i64 = 50_000;

/// Roles, database, tables and rows; pg_stat_statements in database `postgres` when the cluster has it.
pub async fn load(cluster: &Cluster) -> Result<(), String> {
    let admin = connect_super(cluster, "postgres").await?;
    for role in [APP, FLOOD] {
        admin
            .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{role}'"))
            .await
            .map_err(|e| format!("create role {role}: {}", describe(&e)))?;
    }
    admin.batch_execute(&format!("CREATE DATABASE {APP} OWNER {APP}")).await.map_err(|e| format!("create database: {}", describe(&e)))?;
    if cluster.stat_statements {
        admin
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .map_err(|e| format!("pg_stat_statements: {}", describe(&e)))?;
    }
    let db = connect_super(cluster, APP).await?;
    let sql = format!(
        "SET ROLE {APP};
         CREATE TABLE authors (id int PRIMARY KEY, name text NOT NULL, country text NOT NULL);
         CREATE TABLE books (id int PRIMARY KEY, author_id int NOT NULL REFERENCES authors, title text NOT NULL,
                             price numeric(8,2) NOT NULL, published date NOT NULL);
         CREATE TABLE orders (id int PRIMARY KEY, book_id int NOT NULL REFERENCES books, quantity int NOT NULL,
                              amount float8 NOT NULL, created_at timestamptz NOT NULL);
         INSERT INTO authors SELECT i, 'Author ' || i, (ARRAY['FR','DE','JP','BR','US'])[1 + i % 5]
           FROM generate_series(1, {AUTHORS}) i;
         INSERT INTO books SELECT i, 1 + i % {AUTHORS}, 'Book ' || i, (5 + (i * 7919) % 9500 / 100.0)::numeric(8,2),
                                  date '2000-01-01' + i % 9000
           FROM generate_series(1, {BOOKS}) i;
         INSERT INTO orders SELECT i, 1 + (i::int8 * 104729 % {BOOKS})::int, 1 + i % 4, ((i * 31) % 10000) / 100.0,
                                   timestamptz '2024-01-01' + i * interval '1 minute'
           FROM generate_series(1, {ORDERS}) i;
         CREATE INDEX books_author_id ON books (author_id);
         CREATE INDEX orders_book_id ON orders (book_id);
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {FLOOD};
         RESET ROLE;
         ANALYZE;"
    );
    db.batch_execute(&sql).await.map_err(|e| format!("load the sample schema: {}", describe(&e)))?;
    Ok(())
}

/// A superuser connection over the cluster's socket, its connection task spawned.
pub async fn connect_super(cluster: &Cluster, db: &str) -> Result<Client, String> {
    let (client, conn) =
        cluster.super_config(db).connect(NoTls).await.map_err(|e| format!("connect to the demo cluster: {}", describe(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// How upstream work is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Counting {
    /// Statements executed in database `demo` (sum of pg_stat_statements.calls).
    PgStatStatements,
    /// Committed and rolled-back transactions of database `demo` (pg_stat_database; flushed about once a second).
    Transactions,
}

/// The superuser's view of the cluster, from database `postgres` so its own queries are not counted.
pub struct Monitor {
    client: Client,
    pub counting: Counting,
    db_oid: u32,
}

impl Monitor {
    pub async fn new(cluster: &Cluster) -> Result<Monitor, String> {
        let client = connect_super(cluster, "postgres").await?;
        let row = client.query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&APP]).await.map_err(|e| describe(&e))?;
        let counting = if cluster.stat_statements { Counting::PgStatStatements } else { Counting::Transactions };
        Ok(Monitor { client, counting, db_oid: row.get(0) })
    }

    /// The running total of work Postgres did for database `demo`.
    pub async fn executed(&self) -> Result<i64, tokio_postgres::Error> {
        match self.counting {
            Counting::PgStatStatements => {
                let sql = "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE dbid = $1";
                Ok(self.client.query_one(sql, &[&self.db_oid]).await?.get(0))
            }
            Counting::Transactions => {
                // Backends flush their counters at most once a second; wait that out so the delta is complete.
                tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
                self.client.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
                let sql = "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datid = $1";
                Ok(self.client.query_one(sql, &[&self.db_oid]).await?.get(0))
            }
        }
    }

    /// Client connections Postgres holds for database `demo` now.
    pub async fn backends(&self) -> Result<i64, tokio_postgres::Error> {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE datid = $1 AND backend_type = 'client backend'";
        Ok(self.client.query_one(sql, &[&self.db_oid]).await?.get(0))
    }

    pub async fn server_version(&self) -> String {
        match self.client.query_one("SELECT current_setting('server_version')", &[]).await {
            Ok(r) => r.get(0),
            Err(_) => "?".into(),
        }
    }
}
