import pytest
from omegaconf import OmegaConf

from jointdit.errors import ConfigError
from jointdit.evaluate.settings import DetectorSettings


def test_from_config_takes_overrides_from_a_dictconfig():
    cfg = OmegaConf.create({"onset_threshold_db": 6, "video_sources": ["acceleration", "energy"]})
    settings = DetectorSettings.from_config(cfg)
    assert settings.onset_threshold_db == 6 and settings.video_sources == ("acceleration", "energy")
    assert settings.tolerance_frames == DetectorSettings().tolerance_frames
    assert DetectorSettings.from_config(None) == DetectorSettings()


def test_unknown_keys_and_sources_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="onset_treshold"):
        DetectorSettings.from_config({"onset_treshold": 3})
    with pytest.raises(ConfigError, match="flow"):
        DetectorSettings.from_config({"video_sources": ["flow"]})
