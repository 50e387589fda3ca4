//! Which built-in Postgres functions are immutable, and what kind of function each one is.
//!
//! The cache may only answer statements whose result is a pure function of the data and the
//! cache key, so every function call must be immutable (`pg_proc.provolatile = 'i'` for *every*
//! overload, because from text alone we cannot tell which overload Postgres will pick). The
//! lists below were checked against `pg_proc` of Postgres 15 (the query is in the tests'
//! comment). Names with a stable overload (`date_trunc(text, timestamptz)`,
//! `generate_series(timestamptz, ...)`, `quote_literal(anyelement)`, `length(bytea, name)` ...)
//! are left out or restricted by argument count. Anything not listed is `Unknown`: the caller
//! may look it up in `pg_proc` and opt in, but by default it is not cacheable.
//!
//! `coalesce`, `nullif`, `greatest`, `least`, `CASE` and operators are not function calls in
//! the raw parse tree (they are `CoalesceExpr`, `MinMaxExpr`, `A_Expr`...), so they need no
//! entry here; built-in operators are immutable or, for timestamptz arithmetic, stable on
//! `TimeZone`, which is part of the cache key.

/// What Postgres would say about a function, as far as we can tell from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Volatility {
    /// Every built-in overload is immutable.
    Immutable(FuncKind),
    /// Known to be stable or volatile (`now`, `random`, `nextval`, `to_char`, `pg_*` ...).
    NotImmutable,
    /// Not a built-in we know: could be anything, including a user function that writes.
    Unknown,
}

/// The kind of an immutable function, which matters to the batcher: merging rows from several
/// keys must not change what an aggregate, window or set-returning function sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuncKind {
    /// One value in, one value out, per row.
    Scalar,
    /// An aggregate (`count`, `sum`, `array_agg` ...).
    Aggregate,
    /// A window-only function (`row_number`, `lag` ...).
    Window,
    /// Returns a set of rows (`unnest`, `jsonb_array_elements` ...).
    SetReturning,
}

/// Classifies a function call by its name as written (`lower`, `pg_catalog.lower`, `myschema.f`)
/// and its number of arguments.
pub fn volatility(name: &str, nargs: usize) -> Volatility {
    // Only the pg_catalog schema is known; any other qualification may be a user function that
    // shadows a built-in name.
    let bare = match name.split_once('.') {
        None => name,
        Some(("pg_catalog", rest)) if !rest.contains('.') => rest,
        Some(_) => return Volatility::Unknown,
    };
    if let Some(kind) = immutable_kind(bare, nargs) {
        return Volatility::Immutable(kind);
    }
    if bare.starts_with("pg_") || bare.starts_with("txid_") || known_not_immutable(bare) {
        return Volatility::NotImmutable;
    }
    Volatility::Unknown
}

fn immutable_kind(name: &str, nargs: usize) -> Option<FuncKind> {
    use FuncKind::*;
    let kind = match name {
        // Mathematics.
        "abs" | "acos" | "acosd" | "acosh" | "asin" | "asind" | "asinh" | "atan" | "atan2" | "atan2d" | "atand" | "atanh" | "cbrt"
        | "ceil" | "ceiling" | "cos" | "cosd" | "cosh" | "cot" | "cotd" | "degrees" | "div" | "exp" | "factorial" | "floor" | "gcd"
        | "lcm" | "ln" | "log" | "log10" | "mod" | "pi" | "power" | "radians" | "round" | "scale" | "sign" | "sin" | "sind" | "sinh"
        | "sqrt" | "tan" | "tand" | "tanh" | "trunc" | "width_bucket" | "min_scale" | "trim_scale" => Scalar,
        // Strings. Not concat/concat_ws/format/to_char/to_number/to_date/quote_literal:
        // those are STABLE (they call type output functions or read locale settings).
        "ascii"
        | "bit_length"
        | "btrim"
        | "char_length"
        | "character_length"
        | "chr"
        | "decode"
        | "encode"
        | "initcap"
        | "left"
        | "lower"
        | "lpad"
        | "ltrim"
        | "md5"
        | "octet_length"
        | "overlay"
        | "position"
        | "regexp_replace"
        | "regexp_match"
        | "regexp_split_to_array"
        | "regexp_count"
        | "regexp_instr"
        | "regexp_like"
        | "regexp_substr"
        | "repeat"
        | "replace"
        | "reverse"
        | "right"
        | "rpad"
        | "rtrim"
        | "split_part"
        | "starts_with"
        | "strpos"
        | "substr"
        | "substring"
        | "translate"
        | "upper"
        | "to_hex"
        | "sha224"
        | "sha256"
        | "sha384"
        | "sha512"
        | "string_to_array"
        | "quote_ident"
        | "to_ascii"
        | "unistr"
        | "normalize"
        | "is_normalized" => Scalar,
        // length(bytea, encoding name) is stable; the one-argument forms are immutable.
        "length" if nargs == 1 => Scalar,
        // Arrays (array_to_string is stable: it calls element output functions).
        "array_length" | "array_lower" | "array_upper" | "array_ndims" | "array_dims" | "cardinality" | "array_append"
        | "array_prepend" | "array_cat" | "array_position" | "array_positions" | "array_remove" | "array_replace" | "array_fill"
        | "trim_array" => Scalar,
        // JSON accessors (the json/jsonb *builders* and to_json are stable).
        "jsonb_array_length"
        | "jsonb_extract_path"
        | "jsonb_extract_path_text"
        | "jsonb_typeof"
        | "jsonb_strip_nulls"
        | "jsonb_set"
        | "jsonb_set_lax"
        | "jsonb_insert"
        | "jsonb_pretty"
        | "jsonb_path_exists"
        | "jsonb_path_match"
        | "jsonb_path_query_array"
        | "jsonb_path_query_first"
        | "jsonb_object"
        | "json_array_length"
        | "json_extract_path"
        | "json_extract_path_text"
        | "json_typeof"
        | "json_strip_nulls" => Scalar,
        // Dates without a time zone, intervals, network addresses, bits, misc.
        "make_date" | "make_time" | "make_timestamp" | "make_interval" | "justify_days" | "justify_hours" | "justify_interval"
        | "isfinite" | "date_bin" | "num_nonnulls" | "num_nulls" | "host" | "masklen" | "network" | "family" | "netmask" | "broadcast"
        | "abbrev" | "inet_same_family" | "bit_count" | "get_bit" | "get_byte" | "set_bit" | "set_byte" | "bool" | "int2" | "int4"
        | "int8" | "float4" | "float8" | "text" => Scalar,
        // Aggregates whose every overload is immutable (json_agg/jsonb_agg are stable).
        "count" | "sum" | "avg" | "min" | "max" | "bool_and" | "bool_or" | "every" | "array_agg" | "string_agg" | "bit_and" | "bit_or"
        | "bit_xor" | "stddev" | "stddev_pop" | "stddev_samp" | "variance" | "var_pop" | "var_samp" | "corr" | "covar_pop"
        | "covar_samp" | "regr_slope" | "regr_intercept" | "regr_count" | "percentile_cont" | "percentile_disc" | "mode"
        | "jsonb_object_agg" | "range_agg" | "xmlagg" => Aggregate,
        // rank & co. are also aggregates (hypothetical-set); calling them needs OVER or
        // WITHIN GROUP, either of which the batcher refuses anyway.
        "row_number" | "rank" | "dense_rank" | "percent_rank" | "cume_dist" | "ntile" | "lag" | "lead" | "first_value" | "last_value"
        | "nth_value" => Window,
        // Set-returning (generate_series is left out: its timestamptz overload is stable).
        "unnest"
        | "generate_subscripts"
        | "regexp_matches"
        | "regexp_split_to_table"
        | "string_to_table"
        | "jsonb_array_elements"
        | "jsonb_array_elements_text"
        | "jsonb_each"
        | "jsonb_each_text"
        | "jsonb_object_keys"
        | "jsonb_path_query"
        | "json_array_elements"
        | "json_array_elements_text"
        | "json_each"
        | "json_each_text"
        | "json_object_keys" => SetReturning,
        _ => return None,
    };
    Some(kind)
}

/// Functions we know are stable or volatile. Only used to give a precise reason (anything
/// unlisted is refused anyway), so this list documents the dangerous cases rather than
/// guarding them.
fn known_not_immutable(name: &str) -> bool {
    matches!(
        name,
        // Time: differ per transaction or per call.
        "now" | "clock_timestamp" | "statement_timestamp" | "transaction_timestamp"
            | "timeofday" | "age" | "date_part" | "date_trunc" | "extract" | "timezone"
            | "to_timestamp" | "make_timestamptz" | "generate_series"
            // Randomness and sequences: differ per call, and nextval/setval write.
            | "random" | "random_normal" | "setseed" | "gen_random_uuid" | "uuid_generate_v1"
            | "uuid_generate_v4" | "nextval" | "currval" | "lastval" | "setval"
            // Session state.
            | "current_setting" | "set_config" | "current_database" | "current_schema"
            | "current_schemas" | "current_user" | "current_role" | "session_user" | "user"
            | "current_query" | "inet_client_addr" | "inet_client_port" | "inet_server_addr"
            | "inet_server_port" | "version" | "has_table_privilege" | "has_schema_privilege"
            | "has_column_privilege" | "has_function_privilege" | "has_database_privilege"
            // Output-function or locale dependent.
            | "concat" | "concat_ws" | "format" | "to_char" | "to_number" | "to_date"
            | "quote_literal" | "quote_nullable" | "array_to_string" | "to_json" | "to_jsonb"
            | "row_to_json" | "array_to_json" | "json_build_object" | "json_build_array"
            | "jsonb_build_object" | "jsonb_build_array" | "json_agg" | "jsonb_agg"
            | "json_object_agg" | "numeric" | "length"
            // Large objects, advisory locks and notifications have side effects.
            | "lo_import" | "lo_export" | "lo_unlink" | "lo_create" | "lo_open"
            | "lo_get" | "lo_put" | "dblink" | "dblink_exec"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checked on Postgres 15 with:
    //   select proname, string_agg(distinct provolatile::text, ''), string_agg(distinct
    //   prokind::text, ''), bool_or(proretset) from pg_proc where pronamespace =
    //   'pg_catalog'::regnamespace and proname = any(...) group by 1;

    #[test]
    fn plain_string_and_math_functions_are_immutable() {
        for f in ["lower", "upper", "btrim", "md5", "abs", "round", "substring", "replace"] {
            assert_eq!(volatility(f, 1), Volatility::Immutable(FuncKind::Scalar), "{f}");
        }
        assert_eq!(volatility("pg_catalog.lower", 1), Volatility::Immutable(FuncKind::Scalar));
    }

    #[test]
    fn stable_string_functions_are_not_immutable() {
        for f in ["concat", "concat_ws", "format", "to_char", "quote_literal", "array_to_string"] {
            assert_eq!(volatility(f, 2), Volatility::NotImmutable, "{f}");
        }
    }

    #[test]
    fn length_is_immutable_only_with_one_argument() {
        assert_eq!(volatility("length", 1), Volatility::Immutable(FuncKind::Scalar));
        assert_eq!(volatility("length", 2), Volatility::NotImmutable);
    }

    #[test]
    fn time_random_sequence_and_session_functions_are_not_immutable() {
        for f in ["now", "random", "nextval", "current_setting", "clock_timestamp", "txid_current"] {
            assert_eq!(volatility(f, 0), Volatility::NotImmutable, "{f}");
        }
        assert_eq!(volatility("pg_sleep", 1), Volatility::NotImmutable);
        assert_eq!(volatility("pg_catalog.pg_backend_pid", 0), Volatility::NotImmutable);
    }

    #[test]
    fn unknown_and_schema_qualified_user_functions_are_unknown() {
        assert_eq!(volatility("my_func", 0), Volatility::Unknown);
        assert_eq!(volatility("public.lower", 1), Volatility::Unknown);
        assert_eq!(volatility("a.b.lower", 1), Volatility::Unknown);
    }

    #[test]
    fn aggregates_windows_and_set_returning_functions_are_labelled() {
        assert_eq!(volatility("count", 1), Volatility::Immutable(FuncKind::Aggregate));
        assert_eq!(volatility("row_number", 0), Volatility::Immutable(FuncKind::Window));
        assert_eq!(volatility("unnest", 1), Volatility::Immutable(FuncKind::SetReturning));
    }
}
