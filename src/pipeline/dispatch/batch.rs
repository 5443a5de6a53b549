//! Batches (README: Batches): several messages of a module in one request.
//!
//! [`Endpoint::deliver_batch`] sends the messages a lane gathered (each
//! already through the module's script) as one body: `[` + the bodies
//! joined by `,` + `]`, or NDJSON. The batch is retried whole, with the
//! module's delay, backoff, `Retry-After` and status rules
//! ([`Endpoint::send`]). When its retries are used up (or a `fail_on`
//! answer or `retry_max_age` ends them) and it holds more than one
//! message, it is split in two halves, the first half holding the extra
//! message of an odd count, and each half is sent with the module's
//! retries again, first half first, until a message that fails alone is
//! exhausted by itself. Every message gets its own outcome; its attempts
//! count every request that carried it.

use super::*;

use crate::config::BatchFormat;

static X_MKC_BATCH_SIZE: HeaderName = HeaderName::from_static("x-mkc-batch-size");
static X_MKC_OFFSETS: HeaderName = HeaderName::from_static("x-mkc-offsets");

/// What a batch's request says about its messages instead of one
/// message's headers.
#[derive(Debug, Clone)]
pub struct BatchHeaders {
    /// `Content-Type`: `application/json` or `application/x-ndjson`.
    content_type: HeaderValue,
    /// `X-Mkc-Batch-Size`: how many messages.
    size: HeaderValue,
    /// `X-Mkc-Offsets`: `partition:offset` of each message in body order,
    /// comma-separated (the topic is `X-Mkc-Topic`).
    offsets: HeaderValue,
    /// `Idempotency-Key`: `<topic>-batch-<n>-<hash>`, the hash (64-bit
    /// FNV-1a, hex) of the messages' own keys, each followed by `,`.
    key: HeaderValue,
}

impl BatchHeaders {
    fn new(msgs: &[&Message], format: BatchFormat) -> BatchHeaders {
        let mut offsets = String::with_capacity(msgs.len() * 12);
        let mut keys = String::with_capacity(msgs.len() * 24);
        for msg in msgs {
            if !offsets.is_empty() {
                offsets.push(',');
            }
            offsets.push_str(&format!("{}:{}", msg.partition, msg.offset));
            keys.push_str(&idempotency_key(msg));
            keys.push(',');
        }
        let topic = msgs.first().map_or("", |m| &m.topic);
        let key = format!(
            "{topic}-batch-{}-{:016x}",
            msgs.len(),
            fnv1a(keys.as_bytes())
        );
        BatchHeaders {
            content_type: HeaderValue::from_static(match format {
                BatchFormat::Json => "application/json",
                BatchFormat::Ndjson => "application/x-ndjson",
            }),
            size: HeaderValue::from(msgs.len()),
            // Digits, `:` and `,`: always a valid value.
            offsets: HeaderValue::from_str(&offsets).unwrap_or(HeaderValue::from_static("")),
            key: HeaderValue::from_str(&key)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid-topic-name")),
        }
    }

    pub(super) fn insert_into(&self, h: &mut HeaderMap) {
        h.insert(CONTENT_TYPE, self.content_type.clone());
        h.insert(X_MKC_BATCH_SIZE.clone(), self.size.clone());
        h.insert(X_MKC_OFFSETS.clone(), self.offsets.clone());
        h.insert(IDEMPOTENCY_KEY.clone(), self.key.clone());
    }
}

/// One message of a batch: what its script made of it, and the observer
/// of its delivery (its dispatch log row).
pub struct Member<'a> {
    pub msg: &'a Message,
    pub prepared: &'a Prepared,
    pub observer: &'a dyn Observer,
}

/// The observers of a batch's messages as one: a failed attempt is each
/// message's attempt (numbered after those it already had), a skip of any
/// of them ends the batch's attempts.
struct Together<'a> {
    /// Each member's observer and the attempts it had before this request.
    members: Vec<(&'a dyn Observer, u32)>,
}

impl Observer for Together<'_> {
    fn attempt_failed(&self, attempt: u32, http_status: Option<u16>, error: &str) {
        for (observer, before) in &self.members {
            observer.attempt_failed(before + attempt, http_status, error);
        }
    }

    fn skip_requested(&self) -> bool {
        self.members.iter().any(|(o, _)| o.skip_requested())
    }
}

impl Endpoint {
    /// Whether a message its script made `prepared` of can go in a batch:
    /// not when the script gave it headers, a path or a query of its own
    /// (it is then sent alone, as with `batch 1`).
    pub fn batchable(&self, prepared: &Prepared) -> bool {
        prepared.headers.is_empty() && prepared.uri == self.uri
    }

    /// Delivers `members` (in body order, all [`Endpoint::batchable`]) as
    /// batches, split on failure (see the module's comment). Returns one
    /// outcome per member, in the same order; a member not finished when
    /// the delivery stopped is [`Outcome::Aborted`].
    pub async fn deliver_batch(&self, members: &[Member<'_>], cancel: &Cancel) -> Vec<Outcome> {
        let watch = self.controls.watch.as_deref();
        let _watching: Vec<Watching> = members
            .iter()
            .map(|m| {
                if let Some(w) = watch {
                    w.started(m.msg);
                }
                Watching(watch.map(|w| (w, m.msg)))
            })
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; members.len()];
        // Attempts each member had so far.
        let mut tried = vec![0u32; members.len()];
        // Parts still to send, the next one last.
        let mut parts: Vec<Vec<usize>> = vec![(0..members.len()).collect()];
        while let Some(part) = parts.pop() {
            let msgs: Vec<&Message> = part.iter().map(|&i| members[i].msg).collect();
            let prepared = self.batch_request(members, &part, &msgs);
            let together = Together {
                members: part
                    .iter()
                    .map(|&i| (members[i].observer, tried[i]))
                    .collect(),
            };
            match self.send(&msgs, &prepared, cancel, &together).await {
                Outcome::Delivered { attempts } => {
                    for &i in &part {
                        outcomes[i] = Some(Outcome::Delivered {
                            attempts: tried[i] + attempts,
                        });
                    }
                }
                Outcome::Exhausted {
                    attempts,
                    last_error,
                    http_status,
                } if part.len() == 1 => {
                    outcomes[part[0]] = Some(Outcome::Exhausted {
                        attempts: tried[part[0]] + attempts,
                        last_error,
                        http_status,
                    });
                }
                Outcome::Exhausted {
                    attempts,
                    last_error,
                    ..
                } => {
                    for &i in &part {
                        tried[i] += attempts;
                    }
                    let (first, second) = part.split_at(part.len().div_ceil(2));
                    let msg = msgs[0];
                    tracing::warn!(
                        topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                        module = %self.module.name, messages = part.len(), attempts,
                        last_error = %last_error,
                        "batch failed: sending it again as two halves of {} and {}",
                        first.len(), second.len()
                    );
                    parts.push(second.to_vec());
                    parts.push(first.to_vec());
                }
                Outcome::Skipped { attempts } => {
                    let mut rest = Vec::with_capacity(part.len());
                    for &i in &part {
                        tried[i] += attempts;
                        let m = &members[i];
                        if self.skip_requested(&[m.msg], tried[i], m.observer) {
                            outcomes[i] = Some(self.skipped(&[m.msg], tried[i]));
                        } else {
                            rest.push(i);
                        }
                    }
                    if !rest.is_empty() {
                        parts.push(rest);
                    }
                }
                // Stopped: what is not finished stays unfinished.
                Outcome::Aborted | Outcome::Filtered | Outcome::ScriptError { .. } => break,
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Aborted))
            .collect()
    }

    /// The request of the members at `part` (`msgs`, their messages).
    fn batch_request(&self, members: &[Member<'_>], part: &[usize], msgs: &[&Message]) -> Prepared {
        let format = self.module.contract.batch.format;
        let bodies = || part.iter().map(|&i| &members[i].prepared.body);
        let mut body = Vec::with_capacity(bodies().map(|b| b.len() + 1).sum::<usize>() + 2);
        match format {
            BatchFormat::Json => {
                body.push(b'[');
                for (n, b) in bodies().enumerate() {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(b);
                }
                body.push(b']');
            }
            BatchFormat::Ndjson => {
                for b in bodies() {
                    body.extend_from_slice(b);
                    body.push(b'\n');
                }
            }
        }
        Prepared {
            body: Bytes::from(body),
            uri: self.uri.clone(),
            headers: Vec::new(),
            // The latest of the members' delays: no message goes out
            // before it is due.
            delay: part
                .iter()
                .map(|&i| members[i].prepared.delay)
                .max()
                .unwrap_or_default(),
            batch: Some(BatchHeaders::new(msgs, format)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A loopback endpoint answering 500 to a body holding `POISON`, else
    /// 204; what it received: (X-Mkc-Offsets, body) in arrival order.
    async fn sink() -> (std::net::SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/b",
            axum::routing::post(move |headers: http::HeaderMap, body: Bytes| {
                let record = record.clone();
                async move {
                    let offsets = headers
                        .get("x-mkc-offsets")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body = String::from_utf8_lossy(&body).to_string();
                    let poisoned = body.contains("POISON");
                    record.lock().unwrap().push((offsets, body));
                    match poisoned {
                        true => http::StatusCode::INTERNAL_SERVER_ERROR,
                        false => http::StatusCode::NO_CONTENT,
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, seen)
    }

    /// Prepares `msgs` (no script) and delivers them as one batch.
    async fn deliver(endpoint: &Endpoint, msgs: &[Message]) -> Vec<Outcome> {
        let prepared: Vec<Prepared> = msgs
            .iter()
            .map(|m| endpoint.prepare(m).unwrap().unwrap())
            .collect();
        let members: Vec<Member> = msgs
            .iter()
            .zip(&prepared)
            .map(|(msg, prepared)| Member {
                msg,
                prepared,
                observer: &NoObserver,
            })
            .collect();
        endpoint.deliver_batch(&members, &Cancel::default()).await
    }

    fn message(offset: i64, data: &str) -> Message {
        Message {
            source: crate::source::SourceKind::Kafka,
            pattern: None,
            topic: Arc::from("t"),
            partition: 1,
            offset,
            timestamp_ms: None,
            key: None,
            payload: Bytes::from(format!("{{\"commandId\": 1, \"data\": \"{data}\"}}")),
            envelope: crate::pipeline::envelope::Envelope {
                command_id: crate::config::CommandId(1),
                commit_id: None,
            },
            headers: Vec::new(),
        }
    }

    fn endpoint(addr: std::net::SocketAddr, format: BatchFormat) -> Endpoint {
        let text = format!("name b\nuri http://{addr}/b\nfilters 1\nretrynum 1\nretry_delay 1\n");
        let server = "brokers 127.0.0.1:9092\ntopic t\nmodule b.conf\n";
        let config =
            crate::config::load_str(std::path::Path::new("/x/server.conf"), server, |_| {
                Ok(text.clone().into_bytes())
            })
            .unwrap()
            .config;
        let mut module = config.modules[0].clone();
        module.contract.batch.size = 100;
        module.contract.batch.format = format;
        Endpoint::new(Arc::new(module)).unwrap()
    }

    #[tokio::test]
    async fn a_poison_message_is_split_out_and_alone_exhausted() {
        let (addr, seen) = sink().await;
        let endpoint = endpoint(addr, BatchFormat::Json);
        let msgs: Vec<Message> = (0..5)
            .map(|i| message(10 + i, if i == 3 { "POISON" } else { "ok" }))
            .collect();
        let outcomes = deliver(&endpoint, &msgs).await;
        // [10..15) ×2, [10,11,12] ok, [13,14] ×2, [13] ×2, [14] ok.
        let offsets: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(
            offsets,
            [
                "1:10,1:11,1:12,1:13,1:14",
                "1:10,1:11,1:12,1:13,1:14",
                "1:10,1:11,1:12",
                "1:13,1:14",
                "1:13,1:14",
                "1:13",
                "1:13",
                "1:14",
            ]
        );
        let delivered = |attempts| Outcome::Delivered { attempts };
        assert_eq!(outcomes[..3], [delivered(3), delivered(3), delivered(3)]);
        assert!(
            matches!(
                outcomes[3],
                Outcome::Exhausted {
                    attempts: 6,
                    http_status: Some(500),
                    ..
                }
            ),
            "{:?}",
            outcomes[3]
        );
        assert_eq!(outcomes[4], delivered(5));
        let first_body = &seen.lock().unwrap()[2].1;
        let want = format!(
            "[{},{},{}]",
            String::from_utf8_lossy(&msgs[0].payload),
            String::from_utf8_lossy(&msgs[1].payload),
            String::from_utf8_lossy(&msgs[2].payload)
        );
        assert_eq!(first_body, &want);
    }

    #[tokio::test]
    async fn an_ndjson_batch_ends_each_payload_with_a_newline() {
        let (addr, seen) = sink().await;
        let endpoint = endpoint(addr, BatchFormat::Ndjson);
        let msgs: Vec<Message> = (0..2).map(|i| message(i, "ok")).collect();
        let outcomes = deliver(&endpoint, &msgs).await;
        assert_eq!(outcomes, vec![Outcome::Delivered { attempts: 1 }; 2]);
        let body = seen.lock().unwrap()[0].1.clone();
        let one = String::from_utf8_lossy(&msgs[0].payload).to_string();
        assert_eq!(body, format!("{one}\n{one}\n"));
    }
}
