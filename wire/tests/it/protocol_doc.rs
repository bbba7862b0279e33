//! PROTOCOL.md and this crate agree: the error code table (§5), the message type table (§3) and
//! the `Info` layout (§3, 0x86) are read from the document and compared with the code.

use tally_wire::*;

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    std::fs::read_to_string(path).expect("PROTOCOL.md at the workspace root")
}

/// The cells of a markdown table row, trimmed, without the outer pipes.
fn cells(line: &str) -> Vec<&str> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// The text of the section that starts with `heading`, up to the next heading of any level.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?}"));
    let body = &text[start + heading.len()..];
    let end = body.find("\n#").unwrap_or(body.len());
    &body[..end]
}

#[test]
fn the_error_code_table_is_the_code() {
    let text = protocol_md();
    let table = section(&text, "## 5. Errors");
    let mut documented = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| ")) {
        let c = cells(line);
        // The code table's rows; the retry-class table below it has no backticked names.
        let (Ok(number), true) = (c[0].parse::<u16>(), c[1].starts_with('`')) else {
            continue;
        };
        documented.push((number, c[1].trim_matches('`').to_string(), c[2].to_string()));
    }
    let code: Vec<(u16, String, String)> = ErrorCode::ALL
        .iter()
        .map(|&e| {
            let retry = match e.retry() {
                Retry::Never => "never",
                Retry::Later => "later",
                Retry::Elsewhere => "elsewhere",
            };
            (e as u16, e.name().to_string(), retry.to_string())
        })
        .collect();
    assert_eq!(documented, code);
}

#[test]
fn the_message_type_table_is_the_code() {
    let text = protocol_md();
    let table = section(&text, "## 3. Messages");
    let mut documented = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| `0x")) {
        let c = cells(line);
        let t = u8::from_str_radix(c[0].trim_matches('`').trim_start_matches("0x"), 16).unwrap();
        let request = match c[2] {
            "client → server" => true,
            "server → client" => false,
            other => panic!("direction {other:?}"),
        };
        documented.push((t, request));
    }
    let all = (0..=u8::MAX).filter(|&t| {
        let frame = RawFrame {
            message_type: t,
            correlation_id: 1,
            payload: Vec::new(),
        };
        !matches!(
            Message::decode(&frame),
            Err(WireError::UnknownMessageType { .. })
        )
    });
    let code: Vec<(u8, bool)> = all.map(|t| (t, message_type::is_request(t))).collect();
    documented.sort();
    assert_eq!(documented, code);
    assert!(
        table.contains("every reply type included, is answered `unknown_message_type` (3)"),
        "§3 names the code a reply type gets"
    );
    assert_eq!(ErrorCode::UnknownMessageType as u16, 3);
}

#[test]
fn the_info_layout_is_the_code() {
    let text = protocol_md();
    let table = section(&text, "### 0x86 Info");
    let mut next = 0usize;
    for line in table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("---"))
    {
        let c = cells(line);
        let (Ok(offset), Ok(size)) = (c[0].parse::<usize>(), c[1].parse::<usize>()) else {
            continue;
        };
        assert_eq!(offset, next, "{line}");
        next += size;
    }
    assert_eq!(next, INFO_BYTES);
    assert!(table.contains(&format!("{INFO_BYTES} bytes")));
    // The rows from the client limits on are the ones an older server leaves out.
    let first_limit = table
        .lines()
        .find(|l| l.contains("handshake_timeout_ms"))
        .expect("a handshake_timeout_ms row");
    assert_eq!(
        cells(first_limit)[0].parse::<usize>().unwrap(),
        INFO_BYTES_WITHOUT_CLIENT_LIMITS
    );
    assert!(table.contains(&format!("{INFO_BYTES_WITHOUT_CLIENT_LIMITS} bytes")));
    let mut info = InfoReply {
        chain_id: [0; 32],
        operator_public_key: [0; 32],
        node_id: 0,
        frame_bytes_max: 0,
        reply_payload_bytes_max: REPLY_PAYLOAD_BYTES_MAX,
        requests_in_flight_max: 0,
        headers_per_reply_max: HEADERS_PER_REPLY_MAX,
        client_limits: Some(ClientLimits {
            handshake_timeout_ms: 0,
            first_request_timeout_ms: 0,
            frame_timeout_ms: 0,
            idle_timeout_ms: 0,
            write_timeout_ms: 0,
            connections_per_address_max: 0,
        }),
    };
    let mut payload = Vec::new();
    Message::Info(Box::new(info.clone())).encode_payload(&mut payload);
    assert_eq!(payload.len(), INFO_BYTES);
    info.client_limits = None;
    payload.clear();
    Message::Info(Box::new(info)).encode_payload(&mut payload);
    assert_eq!(payload.len(), INFO_BYTES_WITHOUT_CLIENT_LIMITS);
    assert!(table.contains("984,565") && REPLY_PAYLOAD_BYTES_MAX == 984_565);
}
