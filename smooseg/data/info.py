"""What a trained model keeps of its data set: :class:`DatasetInfo`, plain values only."""

from dataclasses import dataclass

from smooseg.data.registry import find_spec
from smooseg.data.spec import DEFAULT_EVAL_RES


def class_names(name, n_classes=None):
    """Class names of data set ``name`` when it has them (and their count is ``n_classes``), else
    ``class_0 .. class_{n-1}`` (sets without names of their own, or another class count)."""
    spec = find_spec(name)
    names = spec.class_names if spec is not None else ()
    if names and (n_classes is None or len(names) == int(n_classes)):
        return list(names)
    return [f"class_{i}" for i in range(int(n_classes))]


def default_eval_res(name):
    """The evaluation resolution data set ``name`` declares (unknown names: the common default)."""
    spec = find_spec(name)
    return spec.eval_res if spec is not None else DEFAULT_EVAL_RES


@dataclass
class DatasetInfo:
    """The data set a model was trained for: its classes, and how its images were read and
    validated (what evaluation defaults to). ``class_names`` and ``eval_res`` left None take
    the data set's own (:func:`class_names`, :func:`default_eval_res`)."""

    n_classes: int
    name: str = "directory"
    class_names: list | None = None
    dir_name: str | None = None         # user-named sets: the folder under data_dir
    eval_res: int | None = None
    image_interp: str = "nearest"

    def __post_init__(self):
        self.n_classes = int(self.n_classes)
        self.class_names = list(self.class_names or class_names(self.name, self.n_classes))
        self.eval_res = int(self.eval_res or default_eval_res(self.name))

    def to_dict(self):
        return {"n_classes": self.n_classes, "name": self.name, "class_names": list(self.class_names),
                "dir_name": self.dir_name, "eval_res": self.eval_res, "image_interp": self.image_interp}
