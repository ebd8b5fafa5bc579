import arrival


def test_send_receive_ack_roundtrip(broker: arrival.Broker) -> None:
    broker.create_queue("q", "at-least-once")
    broker.producer().send("q", b"hello", key="k")
    c = broker.consumer("q", "g")
    msg = c.receive(timeout=0)
    assert msg is not None
    assert (msg.body, msg.key, msg.attempt) == (b"hello", "k", 1)
    msg.ack()
    assert c.receive(timeout=0) is None
