//! Property tests for every decoder of untrusted input: control messages and tags, `FLAG_*`
//! requests and replies, flag files and names. Valid values survive the round trip through the
//! text form; garbage gives an error, never a panic.

use nodus_control::flags::{check_name, file, Flag, FlagKey, FlagReply, FlagRequest, Raise};
use nodus_control::{Body, ComponentId, ControlMessage, Header, MonitoringResult, Spec, Tag};
use nodus_wire::{text, Message};
use proptest::prelude::*;

fn component() -> impl Strategy<Value = Option<ComponentId>> {
    prop_oneof![Just(None), (1u64..).prop_map(ComponentId::new)]
}

fn header() -> impl Strategy<Value = Header> {
    (any::<u64>(), component(), "[ -~]{0,40}", any::<i64>(), any::<i64>())
        .prop_map(|(id, pid, creator, created_at, expires_at)| Header { id, pid, creator, created_at, expires_at })
}

fn body() -> impl Strategy<Value = Body> {
    let spec = prop_oneof![Just(Spec::Monitoring), Just(Spec::Kill)];
    prop_oneof![
        (component(), any::<i64>()).prop_map(|(target, sync_time)| Body::Monitoring { target, sync_time }),
        (component(), any::<i64>(), "[^\u{0}]{1,30}", "[^\u{0}]{1,30}", any::<bool>(), any::<String>()).prop_map(
            |(component, sync_time, name, host, is_running, message)| Body::MonitoringResult {
                component,
                result: MonitoringResult { sync_time, name, host, is_running, message },
            }
        ),
        component().prop_map(|target| Body::Kill { target }),
        (
            component(),
            any::<bool>(),
            proptest::collection::vec((1u64..).prop_map(|n| ComponentId::new(n).unwrap()), 0..5)
        )
            .prop_map(|(component, stopped, unanswered)| Body::KillResult { component, stopped, unanswered }),
        (spec, component(), "[a-z_]{1,20}", any::<String>()).prop_map(|(spec, component, code, message)| Body::Error {
            spec,
            component,
            code,
            message
        }),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,4}){0,2}"
}

fn flag() -> impl Strategy<Value = Flag> {
    (
        (name(), name(), name(), any::<String>(), 0u8..=100, any::<bool>()),
        proptest::collection::btree_set(name(), 0..4),
        ("[^\u{0}]{0,20}", "[^\u{0}]{0,20}", any::<u32>()),
        (any::<i64>(), any::<i64>(), "[a-z0-9.-]{0,20}", "[0-9.]{0,10}", any::<u64>()),
    )
        .prop_map(
            |(
                (unit, section, name, message, priority, manual_down),
                tags,
                (source_file, function, line),
                (date, modified, hostname, version, count),
            )| Flag {
                unit,
                section,
                name,
                message,
                priority,
                manual_down,
                tags,
                source_file,
                function,
                line,
                date,
                modified,
                hostname,
                version,
                count,
            },
        )
}

fn garbage_message() -> impl Strategy<Value = Message> {
    let command = prop_oneof![
        Just("MONITORING"),
        Just("KILL"),
        Just("RESULT"),
        Just("ERROR"),
        Just("FLAG_UP"),
        Just("FLAG_DOWN"),
        Just("FLAG_CLEAR"),
        Just("FLAG_LIST"),
        Just("FLAG_STATUS"),
        Just("FLAG_IS_UP"),
        Just("FLAG_IS_DOWN"),
        Just("FLAGS"),
        Just("OTHER"),
    ];
    let key = prop_oneof![
        Just("tag"),
        Just("spec"),
        Just("message_type"),
        Just("sync_time"),
        Just("component"),
        Just("name"),
        Just("host"),
        Just("is_running"),
        Just("stopped"),
        Just("unanswered"),
        Just("code"),
        Just("unit"),
        Just("section"),
        Just("priority"),
        Just("tags"),
        Just("line"),
        Just("manual_down"),
        Just("count"),
        Just("raised"),
        Just("message"),
    ];
    let value =
        prop_oneof![any::<String>(), "[a-z0-9:,_ -]{0,30}", Just("monitoring".to_string()), Just("kill".to_string())];
    (
        command,
        proptest::collection::btree_map(key, value, 0..10),
        proptest::collection::vec(any::<u8>(), 0..64),
        (any::<u64>(), any::<u64>(), any::<u64>(), ".{0,20}"),
    )
        .prop_map(|(command, params, payload, (id, pid, reply_to, creator))| {
            let mut m = Message::new(command).with_payload(payload);
            for (k, v) in params {
                m = m.param(k, v);
            }
            m.envelope.id = id;
            m.envelope.pid = pid;
            m.envelope.reply_to = reply_to;
            m.envelope.creator = creator;
            m
        })
}

proptest! {
    #[test]
    fn control_messages_round_trip_through_the_text_form(h in header(), b in body()) {
        let m = ControlMessage { header: h, body: b };
        let line = text::to_line(&m.to_message());
        let back = ControlMessage::from_message(&text::from_line(&line).unwrap());
        prop_assert_eq!(back, Ok(m), "{}", line);
    }

    #[test]
    fn tags_round_trip(h in header(), b in body()) {
        let tag = ControlMessage { header: h, body: b }.tag();
        prop_assert_eq!(tag.to_string().parse::<Tag>(), Ok(tag));
    }

    #[test]
    fn garbage_never_panics_a_decoder(m in garbage_message(), s in any::<String>()) {
        let _ = ControlMessage::from_message(&m);
        let _ = FlagRequest::from_message(&m);
        let _ = FlagReply::from_message(&m);
        let _ = s.parse::<Tag>();
        let _ = s.parse::<ComponentId>();
        let _ = file::decode(&s, 0);
    }

    #[test]
    fn flag_files_round_trip(f in flag()) {
        prop_assert_eq!(file::decode(&file::encode(&f), 0), Ok(f));
    }

    #[test]
    fn flag_up_round_trips(f in flag()) {
        let key = FlagKey::new(&f.unit, &f.section, &f.name).unwrap();
        let mut r = Raise::new(key, f.message.clone()).priority(f.priority).manual_down(f.manual_down);
        r.tags = f.tags.clone();
        let req = FlagRequest::Up(r.checked().unwrap_or_else(|_| Raise::new(f.key(), "m")));
        let line = text::to_line(&req.to_message());
        prop_assert_eq!(FlagRequest::from_message(&text::from_line(&line).unwrap()), Ok(req));
    }

    #[test]
    fn checked_names_are_normalised_once(s in "[A-Za-z0-9_ -]{0,12}") {
        if let Ok(n) = check_name("name", &s) {
            prop_assert_eq!(check_name("name", &n), Ok(n.clone()));
            prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }
}
