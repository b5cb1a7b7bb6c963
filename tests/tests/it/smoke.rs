use tests::TestStack;

#[tokio::test]
async fn stack_starts_and_stops_cleanly() {
    let stack = TestStack::start().await;
    stack.stop().await;
}
