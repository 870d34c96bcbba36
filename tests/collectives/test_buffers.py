"""BufferPool: buffers are told apart by their memory, whatever their dtype, shape or size."""

import torch

from hecate.collectives.buffers import KEEP_FREE, BufferPool


def test_giving_buffers_of_different_sizes_keeps_the_largest():
    pool = BufferPool()
    sizes = (100, 10, 50)  # the third give drops the smallest; comparing tensors by value used to raise here
    buffers = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    for buffer in buffers:
        pool.give(buffer)
    assert KEEP_FREE == 2
    assert pool.take(60).data_ptr() == buffers[0].data_ptr()
    assert pool.take(1).data_ptr() == buffers[2].data_ptr()
    assert pool.take(1).data_ptr() not in {b.data_ptr() for b in buffers}  # empty pool: a new buffer


def test_any_dtype_and_shape_goes_back_as_its_whole_storage():
    pool = BufferPool()
    matrix = torch.empty(3, 5, dtype=torch.bfloat16)  # 30 bytes
    view = torch.empty(8, dtype=torch.float64)[2:5]  # a view: its whole 64-byte storage goes back
    pool.give(matrix)
    pool.give(view)
    taken = pool.take(40)
    assert taken.dtype == torch.uint8 and taken.numel() == 64 and taken.data_ptr() == view.untyped_storage().data_ptr()
    taken = pool.take(30)
    assert taken.numel() == 30 and taken.data_ptr() == matrix.data_ptr()


def test_the_same_memory_given_twice_is_handed_out_once():
    pool = BufferPool()
    buffer = torch.empty(64, dtype=torch.uint8)
    pool.give(buffer[:16].view(torch.float32))
    pool.give(buffer[32:])  # another view of the same memory
    first, second = pool.take(8), pool.take(8)
    assert first.data_ptr() == buffer.data_ptr() and second.data_ptr() != buffer.data_ptr()


def test_empty_tensors_are_ignored():
    pool = BufferPool()
    pool.give(torch.empty(0, dtype=torch.float16))
    assert pool.take(0).numel() == 0
