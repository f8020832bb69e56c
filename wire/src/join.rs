//! [`join_all`]: run futures concurrently on the calling task. Std only, no runtime: the client
//! fans out to its shards with it (tokio) and a shard reads a value's chunk files with it
//! (glommio).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Runs futures concurrently on the current task and returns their outputs in order. Meant for
/// a handful of futures: a wake re-polls every pending one.
pub async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures = futures.into_iter().map(Box::pin).collect::<Vec<Pin<Box<F>>>>();
    let mut outputs = futures.iter().map(|_| None).collect::<Vec<Option<F::Output>>>();
    std::future::poll_fn(|context| {
        let mut done = true;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
