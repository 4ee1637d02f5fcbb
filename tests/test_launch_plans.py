"""refattn.backends.launch: CUDA's launch limits, checked on plans without a GPU."""

from refattn.backends.launch import FunctionPlan, Launch, Shape


def test_a_launch_within_every_limit_has_no_violation():
    launch = Launch("k", grid=(2**31 - 1, 65_535, 65_535), block=(1_024, 1, 1), static_shared_bytes=48 * 1_024,
                    largest_index=2**40)
    assert launch.violations() == []


def test_each_limit_is_reported():
    block = (32, 1, 1)
    assert Launch("k", grid=(2**31, 1, 1), block=block).violations() == ["grid.x = 2147483648 outside [1, 2147483647]"]
    assert Launch("k", grid=(1, 65_536, 1), block=(32, 1, 1)).violations() == ["grid.y = 65536 outside [1, 65535]"]
    assert Launch("k", grid=(1, 1, 0), block=(32, 1, 1)).violations() == ["grid.z = 0 outside [1, 65535]"]
    assert Launch("k", grid=(1, 1, 1), block=(1, 1, 65)).violations() == ["block.z = 65 outside [1, 64]"]
    assert Launch("k", grid=(1, 1, 1), block=(64, 32, 1)).violations() == ["2048 threads per block > 1024"]
    assert Launch("k", grid=(1, 1, 1), block=(32, 1, 1), static_shared_bytes=49_153).violations() == [
        "static shared memory 49153 B > 49152 B", "shared memory 49153 B > 49152 B without the dynamic opt-in"]
    assert Launch("k", grid=(1, 1, 1), block=(32, 1, 1), dynamic_shared_bytes=60_000).violations() == [
        "shared memory 60000 B > 49152 B without the dynamic opt-in"]
    assert Launch("k", grid=(1, 1, 1), block=block, dynamic_shared_bytes=60_000, shared_opt_in=True).violations() == []
    assert Launch("k", grid=(1, 1, 1), block=block, dynamic_shared_bytes=200_000, shared_opt_in=True).violations() == [
        "shared memory 200000 B > 166912 B, the most a block may opt in to"]
    assert Launch("k", grid=(1, 1, 1), block=(32, 1, 1), largest_index=2**31, wide_indices=False).violations() == [
        "index 2147483648 > 2^31 - 1 in 32-bit index arithmetic"]


def test_a_function_plan_names_the_kernel_and_the_memory_bound():
    plan = FunctionPlan("cupy", "fsat.attention", Shape(1, 8, 65_536, 64, 64), "float32",
                        (Launch("ok", (1, 1, 1), (32, 1, 1)), Launch("wide", (1, 70_000, 1), (32, 1, 1))),
                        peak_bytes=2_000, bound_bytes=1_000, bound="1000 B")
    assert plan.violations() == ["wide: grid.y = 70000 outside [1, 65535]",
                                 "device-memory peak 2000 B > the bound 1000 B (1000 B)"]
    assert plan.shape.label() == "B1 H8 L65536 D64 Dv64 K16 C1 W1"
