//! How the CLI shows a membership (`tally cluster …`): JSON for scripts, a table for people.

use serde::Serialize;
use tally_wire::{MemberRole, MembersReply};

/// `tally cluster members --json`: `{"leader_id":N,"members":[{"id":1,"address":"host:port",
/// "client_address":"host:port","role":"voter"},…]}`, members in id order, `role` `"voter"` or
/// `"learner"`, `leader_id` 0 when no leader is known, `client_address` `""` when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MembersJson {
    pub leader_id: u64,
    pub members: Vec<MemberJson>,
}

/// One member in [`MembersJson`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberJson {
    pub id: u64,
    pub address: String,
    pub client_address: String,
    pub role: &'static str,
}

impl MembersJson {
    pub fn new(reply: &MembersReply) -> MembersJson {
        MembersJson {
            leader_id: reply.leader_id,
            members: reply
                .members
                .iter()
                .map(|m| MemberJson {
                    id: m.id,
                    address: m.address.clone(),
                    client_address: m.client_address.clone(),
                    role: m.role.name(),
                })
                .collect(),
        }
    }
}

/// The membership as one line of JSON (what `--json` prints).
pub fn members_json(reply: &MembersReply) -> String {
    serde_json::to_string(&MembersJson::new(reply)).expect("plain structs serialize")
}

/// The membership as a table, one member a line, the leader marked.
pub fn members_table(reply: &MembersReply) -> String {
    let mut out = format!(
        "{:>4}  {:<8}  {:<6}  {:<24}  CLIENT ADDRESS\n",
        "ID", "ROLE", "LEADER", "PEER ADDRESS"
    );
    for m in &reply.members {
        let role = match m.role {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        };
        let leader = if m.id == reply.leader_id { "*" } else { "" };
        let client = if m.client_address.is_empty() {
            "-"
        } else {
            m.client_address.as_str()
        };
        out.push_str(&format!(
            "{:>4}  {role:<8}  {leader:<6}  {:<24}  {client}\n",
            m.id, m.address
        ));
    }
    if reply.leader_id == 0 {
        out.push_str("no leader known\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_wire::Member;

    fn sample() -> MembersReply {
        MembersReply {
            leader_id: 1,
            members: vec![
                Member {
                    id: 1,
                    role: MemberRole::Voter,
                    address: "127.0.0.1:7500".into(),
                    client_address: "127.0.0.1:7400".into(),
                },
                Member {
                    id: 4,
                    role: MemberRole::Learner,
                    address: "127.0.0.1:7503".into(),
                    client_address: String::new(),
                },
            ],
        }
    }

    #[test]
    fn json_shape() {
        assert_eq!(
            members_json(&sample()),
            r#"{"leader_id":1,"members":[{"id":1,"address":"127.0.0.1:7500","client_address":"127.0.0.1:7400","role":"voter"},{"id":4,"address":"127.0.0.1:7503","client_address":"","role":"learner"}]}"#
        );
        let empty = MembersReply {
            leader_id: 0,
            members: vec![],
        };
        assert_eq!(members_json(&empty), r#"{"leader_id":0,"members":[]}"#);
        // What scripts read: every member has exactly these four keys.
        let value: serde_json::Value = serde_json::from_str(&members_json(&sample())).unwrap();
        for m in value["members"].as_array().unwrap() {
            let mut keys: Vec<_> = m.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            assert_eq!(keys, ["address", "client_address", "id", "role"]);
        }
    }

    #[test]
    fn table_marks_the_leader() {
        let table = members_table(&sample());
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[1].contains("voter") && lines[1].contains('*'),
            "{table}"
        );
        assert!(
            lines[2].contains("learner") && !lines[2].contains('*') && lines[2].ends_with('-'),
            "{table}"
        );
        let leaderless = MembersReply {
            leader_id: 0,
            ..sample()
        };
        assert!(members_table(&leaderless).ends_with("no leader known\n"));
    }
}
