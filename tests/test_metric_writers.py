"""Metric logs after a resume: no rows past the restored step, one TensorBoard run."""

from tensorboard.backend.event_processing import event_accumulator

from score_jax.metric_writers import MetricWriter, read_jsonl


def test_resume_continues_logs_from_the_restored_step(tmp_path):
  first = MetricWriter(str(tmp_path), start_step=0)
  for step in (10, 20, 30):
    first.write(step, {"loss": float(step)})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "lo')  # a row cut short by a kill
  # TensorBoard reads a run's event files in name order, and a name starts with its creation
  # time in whole seconds: date the first run's file a second back, as an earlier process's is,
  # so the resumed run's file sorts after it.
  (events,) = (tmp_path / "tb" / "metrics").iterdir()
  stamp = events.name.split(".")[3]
  earlier = events.name.replace(f".{stamp}.", f".{int(stamp) - 1:010d}.", 1)
  events.rename(events.with_name(earlier))
  second = MetricWriter(str(tmp_path), start_step=20)
  for step in (30, 40):
    second.write(step, {"loss": -float(step)})
  second.close()
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(10, 10.0), (20, 20.0), (30, -30.0),
                                                    (40, -40.0)]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "metrics"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 10.0), (20, 20.0),
                                                              (30, -30.0), (40, -40.0)]


def test_sample_images_go_to_tensorboard_beside_the_scalars(tmp_path):
  import io

  import numpy as np
  from PIL import Image
  png = io.BytesIO()
  Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(png, format="PNG")
  writer = MetricWriter(str(tmp_path), name="sample_metrics")
  writer.write(30, {"mmd": 0.5})
  writer.write_images(30, {"samples/als_grid": png.getvalue()})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "sample_metrics"))
  acc.Reload()
  assert acc.Tags()["images"] == ["samples/als_grid"]
  (image,) = acc.Images("samples/als_grid")
  assert (image.step, image.width, image.height) == (30, 10, 6)
  assert image.encoded_image_string == png.getvalue()
  assert [e.step for e in acc.Scalars("mmd")] == [30]
