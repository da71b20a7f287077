"""Every setting that can ask for a CUDA GPU is refused by one check, in one form."""

import pytest
import torch
from omegaconf import OmegaConf

from clipforge.data.gpu_decode import check_decode_device
from clipforge.distributed import NoSuchGPUError, require_cuda
from clipforge.eval.runtime import check_device
from clipforge.run_checks import check_accelerator


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("refuse", "setting"),
    [
        (lambda: check_accelerator(OmegaConf.create({"accelerator": "gpu"})), "trainer.accelerator=gpu"),
        (lambda: check_device("cuda:0"), "device='cuda:0'"),
        (lambda: check_decode_device("cuda"), "data.augment.decode_device=cuda"),
    ],
)
def test_each_gpu_setting_is_refused_in_one_form_where_torch_sees_none(no_gpu, refuse, setting):
    with pytest.raises(NoSuchGPUError) as err:
        refuse()
    message = str(err.value)
    assert message.startswith(
        f"{setting} asks for a CUDA GPU, but torch sees none (torch {torch.__version__}"
    )
    # a wrong setting for this machine: caught where settings errors are, and where runtime ones are
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)


def test_a_gpu_index_past_the_ones_torch_sees_is_refused(two_gpus):
    require_cuda("device='cuda:1'", "hint", index=1)  # the second of two: fine
    with pytest.raises(
        NoSuchGPUError, match=r"device='cuda:2' asks for a CUDA GPU, but torch sees 2 .*: hint$"
    ):
        require_cuda("device='cuda:2'", "hint", index=2)
    with pytest.raises(NoSuchGPUError, match="torch sees 2"):
        check_device("cuda:5")
