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
