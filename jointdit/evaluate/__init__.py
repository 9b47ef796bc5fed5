"""Evaluation: weight-free sync and event metrics, distances, pretrained metrics from local folders.

    from jointdit.evaluate import evaluate_clips, write_report, log_report, plot_sync, DetectorSettings

``python -m jointdit.evaluate`` is the Hydra entry point (conf/evaluate.yaml).
"""

from jointdit.evaluate.evaluation import TASKS, EvalReport, evaluate_clips
from jointdit.evaluate.events import event_accuracy, load_event_times
from jointdit.evaluate.folder import read_folder, read_video_file
from jointdit.evaluate.matching import accuracy, iou, match_events
from jointdit.evaluate.motion import detect_video_events
from jointdit.evaluate.onsets import detect_onsets
from jointdit.evaluate.plot import plot_sync
from jointdit.evaluate.report import format_table, log_report, write_report
from jointdit.evaluate.settings import DetectorSettings
from jointdit.evaluate.sync import analyse_clip, sync_score

__all__ = ["TASKS", "DetectorSettings", "EvalReport", "accuracy", "analyse_clip", "detect_onsets",
           "detect_video_events", "evaluate_clips", "event_accuracy", "format_table", "iou", "load_event_times",
           "log_report", "match_events", "plot_sync", "read_folder", "read_video_file", "sync_score", "write_report"]
