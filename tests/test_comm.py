import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag


def test_local_communicator_records_exact_bytes():
    comm = LocalCommunicator()
    a = torch.randn(10)
    b = torch.randint(0, 255, (7,), dtype=torch.uint8)
    assert comm.all_reduce(a, "a") is a
    assert comm.all_gather(b, "b")[0] is b
    assert [m.nbytes for m in comm.messages] == [40, 7]
    assert comm.bytes_sent == 47
    got = messages_by_tag(comm.messages)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    # recorded tensors are copies: later in-place changes do not alter the record
    a.zero_()
    assert not torch.equal(got["a"], a)
