"""The part of Triton's ``model_config.proto`` our configs use, as a protobuf descriptor.

Field names, numbers and types follow triton-inference-server/common ``protobuf/
model_config.proto`` (``ModelConfig``, ``ModelInput``, ``ModelOutput``, ``ModelInstanceGroup``,
``ModelDynamicBatching``, ``ModelEnsembling``). Parsing a ``config.pbtxt`` with protobuf's own
text-format parser against it rejects unknown fields, wrong types and bad enum values the way
Triton does, without tritonclient.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

F = descriptor_pb2.FieldDescriptorProto
DATA_TYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32",
              "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16",
              "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]


def _field(message, name, number, kind, *, repeated=False, type_name=None, oneof=None):
    field = message.field.add(name=name, number=number, type=kind,
                              label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof


def _map(message, entry_name, field_name, number):
    entry = message.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _field(entry, "key", 1, F.TYPE_STRING)
    _field(entry, "value", 2, F.TYPE_STRING)
    _field(message, field_name, number, F.TYPE_MESSAGE, repeated=True,
           type_name=f".inference.ModelEnsembling.Step.{entry_name}")


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto",
                                               package="inference", syntax="proto3")
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        data_type.value.add(name=name, number=number)

    group = proto.message_type.add(name="ModelInstanceGroup")
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    _field(group, "name", 1, F.TYPE_STRING)
    _field(group, "count", 2, F.TYPE_INT32)
    _field(group, "gpus", 3, F.TYPE_INT32, repeated=True)
    _field(group, "kind", 4, F.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")

    for name, dims_number in (("ModelInput", 4), ("ModelOutput", 3)):
        message = proto.message_type.add(name=name)
        _field(message, "name", 1, F.TYPE_STRING)
        _field(message, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
        _field(message, "dims", dims_number, F.TYPE_INT64, repeated=True)
        _field(message, "is_shape_tensor", 6, F.TYPE_BOOL)

    batching = proto.message_type.add(name="ModelDynamicBatching")
    _field(batching, "preferred_batch_size", 1, F.TYPE_INT32, repeated=True)
    _field(batching, "max_queue_delay_microseconds", 2, F.TYPE_UINT64)
    _field(batching, "preserve_ordering", 3, F.TYPE_BOOL)

    ensembling = proto.message_type.add(name="ModelEnsembling")
    step = ensembling.nested_type.add(name="Step")
    _field(step, "model_name", 1, F.TYPE_STRING)
    _field(step, "model_version", 2, F.TYPE_INT64)
    _map(step, "InputMapEntry", "input_map", 3)
    _map(step, "OutputMapEntry", "output_map", 4)
    _field(ensembling, "step", 1, F.TYPE_MESSAGE, repeated=True,
           type_name=".inference.ModelEnsembling.Step")

    config = proto.message_type.add(name="ModelConfig")
    config.oneof_decl.add(name="scheduling_choice")
    _field(config, "name", 1, F.TYPE_STRING)
    _field(config, "platform", 2, F.TYPE_STRING)
    _field(config, "max_batch_size", 4, F.TYPE_INT32)
    _field(config, "input", 5, F.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelInput")
    _field(config, "output", 6, F.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelOutput")
    _field(config, "instance_group", 7, F.TYPE_MESSAGE, repeated=True,
           type_name=".inference.ModelInstanceGroup")
    _field(config, "default_model_filename", 8, F.TYPE_STRING)
    _field(config, "dynamic_batching", 11, F.TYPE_MESSAGE, oneof=0,
           type_name=".inference.ModelDynamicBatching")
    _field(config, "ensemble_scheduling", 15, F.TYPE_MESSAGE, oneof=0,
           type_name=".inference.ModelEnsembling")
    _field(config, "backend", 17, F.TYPE_STRING)
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
ModelConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(text: str):
    """A ``ModelConfig`` message; ``text_format.ParseError`` on anything Triton would reject."""
    return text_format.Parse(text, ModelConfig())


def data_type_name(number: int) -> str:
    return DATA_TYPES[number]
