//! Text that machines, forges and clouds send back (runner names, warnings, errors) is not trusted: before it
//! reaches a terminal it loses its control characters (no escape sequences that rewrite the screen, no
//! carriage returns that hide a line, no bidirectional overrides), and before it reaches Markdown it is also
//! escaped, so it cannot mention anyone, link, embed an image or carry HTML.

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

/// `s` for a terminal, on one line: a newline or tab becomes a space, any other control character (and a
/// bidirectional override) becomes U+FFFD.
pub fn terminal(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' | '\t' => ' ',
            c if unsafe_char(c) => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// `s` for a terminal, keeping its lines (an error with a command's output): as [`terminal`], but a newline
/// stays, indented so that no line of it can pass for one of nimbus's own.
pub fn terminal_lines(s: &str) -> String {
    s.split('\n').map(terminal).collect::<Vec<_>>().join("\n    ")
}

/// `s` as literal Markdown text (GitHub's flavour): [`terminal`] first, then every character Markdown or HTML
/// would act on is escaped, `@` cannot start a mention and a URL is not linked.
pub fn markdown(s: &str) -> String {
    // Backtick-quoted parts (nimbus's own reasons quote names so) stay code spans, where nothing renders.
    let clean = terminal(s);
    let parts: Vec<&str> = clean.split('`').collect();
    if parts.len() > 1 && parts.len() % 2 == 1 {
        return parts
            .iter()
            .enumerate()
            .map(|(i, p)| if i % 2 == 1 { markdown_code(p) } else { markdown_plain(p) })
            .collect();
    }
    markdown_plain(&clean)
}

fn markdown_plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '@' => out.push_str("@\u{200B}"),
            // `https://…` would be linked.
            ':' if chars.get(i + 1) == Some(&'/') => out.push_str(":\u{200B}"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '!' | '|' | '#' | '~' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// `s` inside a Markdown code span, where nothing is rendered: only the span's own end (a backtick), a table
/// cell's end and control characters are taken care of.
pub fn markdown_code(s: &str) -> String {
    format!("`{}`", terminal(s).replace('`', "'").replace('|', "\\|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_defused() {
        assert_eq!(terminal("ok\x1b[2J\rgone\nnext\u{202E}"), "ok\u{FFFD}[2J\u{FFFD}gone next\u{FFFD}");
        let md = markdown("@admin see [x](https://evil.example) ![i](y) <img src=x> **b** | c");
        assert!(!md.contains("@admin") && !md.contains("](") && !md.contains("<img") && !md.contains("https://"));
        assert!(!md.contains("**") && md.contains("\\|"), "{md}");
        assert_eq!(markdown_code("a`b|c\x07"), "`a'b\\|c\u{FFFD}`");
        // Quoted names stay code spans; times keep their colons.
        assert_eq!(markdown("pool `mac` at 12:00 (now)"), "pool `mac` at 12:00 \\(now\\)");
        assert!(!markdown("`x` @y https://z").contains("@y"));
    }
}
