//! PgBouncer's userlist format: one `"user" "password-or-secret"` per line, `""` escapes a quote.

/// Parses the whole file; errors name the line.
pub fn parse_auth_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let mut rest = line;
        let user = quoted(&mut rest).ok_or_else(|| format!("line {}: expected \"user\" \"password\"", no + 1))?;
        rest = rest.trim_start();
        let pw = quoted(&mut rest).ok_or_else(|| format!("line {}: expected \"user\" \"password\"", no + 1))?;
        out.push((user, pw));
    }
    Ok(out)
}

fn quoted(s: &mut &str) -> Option<String> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if let Some((_, '"')) = chars.peek() {
                chars.next();
                out.push('"');
                continue;
            }
            *s = &body[i + 1..];
            return Some(out);
        }
        out.push(c);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_users_secrets_and_escaped_quotes() {
        let f = "\"app\" \"app\"\n; comment\n\"o\"\"dd\" \"SCRAM-SHA-256$4096:c2FsdA==$a:b\" extra\n";
        let got = parse_auth_file(f).unwrap();
        assert_eq!(got[0], ("app".into(), "app".into()));
        assert_eq!(got[1].0, "o\"dd");
        assert!(got[1].1.starts_with("SCRAM-SHA-256$"));
        assert!(parse_auth_file("app app").is_err());
    }
}
