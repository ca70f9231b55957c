//! Bidirectional streams (Run, ModelStreamInfer) answered in order, and
//! tonic's oversize-message status rewritten as layerd's limit error.

use std::future::Future;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::error::Error;

/// Answers a stream may compute ahead of a slow reader.
const STREAM_BUFFER: usize = 4;

/// Answers the requests of a bidirectional stream one at a time, in order,
/// from a spawned task feeding a bounded channel (so a slow reader holds back
/// the computation, not the server's memory). An `Err` answer is sent and ends
/// the stream. A client that goes away drops the request in progress before
/// it commits anything.
pub fn answer_in_order<Req, Resp, Fut>(
    mut requests: Streaming<Req>,
    max_message_bytes: u64,
    mut answer: impl FnMut(Req) -> Fut + Send + 'static,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    let (answers, receiver) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        loop {
            let result = tokio::select! {
                request = requests.message() => match request {
                    Ok(None) => break,
                    Ok(Some(request)) => tokio::select! {
                        result = answer(request) => result,
                        _ = answers.closed() => break,
                    },
                    Err(status) => Err(oversize_to_resource_exhausted(status, max_message_bytes)),
                },
                _ = answers.closed() => break,
            };
            let ends_stream = result.is_err();
            if answers.send(result).await.is_err() || ends_stream {
                break;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// tonic answers an oversize message with OUT_OF_RANGE; layerd answers every
/// exceeded limit with RESOURCE_EXHAUSTED naming the flag that sets it.
pub fn oversize_to_resource_exhausted(status: Status, max_message_bytes: u64) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        return Error::LimitExceeded {
            flag: "--max-message-bytes",
            limit: bytesize::ByteSize(max_message_bytes).to_string(),
            detail: status.message().to_string(),
        }
        .into();
    }
    status
}
