// TensorRT IPluginV3 wrapper of the modality-aware top-k kernel; see ModalityTopKPlugin.h.
#include "ModalityTopKPlugin.h"

#ifndef CSPKV_TOPK_WITH_CUDA
#define CSPKV_TOPK_WITH_CUDA 1
#endif
#include "modality_topk.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <new>

using namespace nvinfer1;

namespace
{

ILoggerFinder* gLoggerFinder = nullptr;

void logError(char const* message) noexcept
{
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, message);
    }
    else
    {
        std::fprintf(stderr, "[cspkv::ModalityTopK] %s\n", message);
    }
}

constexpr int32_t kNbInputs = 5;
constexpr int32_t kNbOutputs = 1;

// One scalar attribute in any numeric encoding the ONNX parser or an application may use.
bool readScalar(PluginField const& field, double& value) noexcept
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kFLOAT32:
        value = cspkv_ratio_from_float32(*static_cast<float const*>(field.data));
        return true;
    case PluginFieldType::kFLOAT64: value = *static_cast<double const*>(field.data); return true;
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64:
        value = static_cast<double>(*static_cast<int64_t const*>(field.data));
        return true;
    default: return false;
    }
}

bool isLinear(PluginTensorDesc const& desc) noexcept
{
    return desc.format == TensorFormat::kLINEAR;
}

// Shapes [B, H, L], [B, H, L], [B, L], [B], [B] and output [B, H, c_max]; -1 (unknown at build
// time) matches anything.
bool dimsAgree(int64_t a, int64_t b) noexcept
{
    return a < 0 || b < 0 || a == b;
}

bool shapesAgree(Dims const* in, Dims const* out, int32_t cMax) noexcept
{
    if (in[0].nbDims != 3 || in[1].nbDims != 3 || in[2].nbDims != 2 || in[3].nbDims != 1
        || in[4].nbDims != 1)
    {
        return false;
    }
    for (int32_t i = 0; i < 3; ++i)
    {
        if (!dimsAgree(in[0].d[i], in[1].d[i]))
        {
            return false;
        }
    }
    int64_t const batch = in[0].d[0];
    int64_t const length = in[0].d[2];
    if (!dimsAgree(batch, in[2].d[0]) || !dimsAgree(length, in[2].d[1]) || !dimsAgree(batch, in[3].d[0])
        || !dimsAgree(batch, in[4].d[0]))
    {
        return false;
    }
    if (length >= 0 && (length < cMax || length > std::numeric_limits<int32_t>::max()))
    {
        return false;
    }
    if (out != nullptr
        && (out[0].nbDims != 3 || !dimsAgree(out[0].d[0], batch) || !dimsAgree(out[0].d[1], in[0].d[1])
            || !dimsAgree(out[0].d[2], cMax)))
    {
        return false;
    }
    return true;
}

} // namespace

namespace cspkv
{

// ---- ModalityTopKPlugin ---------------------------------------------------------------------------

ModalityTopKPlugin::ModalityTopKPlugin(double crossRatio, int32_t cMax)
    : mCrossRatio(crossRatio)
    , mCMax(cMax)
{
    initFieldsToSerialize();
}

ModalityTopKPlugin::ModalityTopKPlugin(ModalityTopKPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mCrossRatio(other.mCrossRatio)
    , mCMax(other.mCMax)
{
    initFieldsToSerialize(); // point at this object's members, not the other's
}

void ModalityTopKPlugin::initFieldsToSerialize()
{
    mDataToSerialize.clear();
    mDataToSerialize.emplace_back("cross_ratio", &mCrossRatio, PluginFieldType::kFLOAT64, 1);
    mDataToSerialize.emplace_back("c_max", &mCMax, PluginFieldType::kINT32, 1);
    mFCToSerialize.nbFields = static_cast<int32_t>(mDataToSerialize.size());
    mFCToSerialize.fields = mDataToSerialize.data();
}

IPluginCapability* ModalityTopKPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* ModalityTopKPlugin::clone() noexcept
{
    try
    {
        return new ModalityTopKPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

char const* ModalityTopKPlugin::getPluginName() const noexcept
{
    return kModalityTopKName;
}

char const* ModalityTopKPlugin::getPluginVersion() const noexcept
{
    return kModalityTopKVersion;
}

char const* ModalityTopKPlugin::getPluginNamespace() const noexcept
{
    return kModalityTopKNamespace;
}

int32_t ModalityTopKPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t ModalityTopKPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("ModalityTopK takes 5 inputs and gives 1 output");
        return 1;
    }
    Dims inDims[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i)
    {
        inDims[i] = in[i].desc.dims;
    }
    if (!shapesAgree(inDims, &out[0].desc.dims, mCMax))
    {
        logError("ModalityTopK: shapes must be [B,H,L], [B,H,L], [B,L], [B], [B] with L >= c_max");
        return 1;
    }
    return 0;
}

int32_t ModalityTopKPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNbOutputs || nbInputs != kNbInputs)
    {
        return 1;
    }
    (void) inputTypes;
    outputTypes[0] = DataType::kINT64;
    return 0;
}

int32_t ModalityTopKPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    (void) shapeInputs;
    (void) nbShapeInputs;
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[0].nbDims != 3)
    {
        logError("ModalityTopK: self_scores must be 3-D [B, H, L]");
        return 1;
    }
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2] = exprBuilder.constant(mCMax);
    return 0;
}

bool ModalityTopKPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    DataType wanted = DataType::kINT64; // pos 5: the output
    if (pos <= 1)
    {
        wanted = DataType::kFLOAT;
    }
    else if (pos <= 4)
    {
        wanted = DataType::kINT32;
    }
    return isLinear(desc) && desc.type == wanted;
}

size_t ModalityTopKPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept
{
    (void) inputs;
    (void) nbInputs;
    (void) outputs;
    (void) nbOutputs;
    return 0;
}

int32_t ModalityTopKPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return 1;
    }
    Dims inDims[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i)
    {
        inDims[i] = in[i].dims;
    }
    if (!shapesAgree(inDims, &out[0].dims, mCMax))
    {
        logError("ModalityTopK: runtime shapes must be [B,H,L], [B,H,L], [B,L], [B], [B] with L >= c_max");
        return 1;
    }
    int64_t const max32 = std::numeric_limits<int32_t>::max();
    if (in[0].dims.d[0] > max32 || in[0].dims.d[1] > max32 || in[0].dims.d[0] * in[0].dims.d[1] > max32)
    {
        logError("ModalityTopK: B * H must fit in int32 (one CUDA block per row)");
        return 1;
    }
    return 0;
}

int32_t ModalityTopKPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    (void) outputDesc;
    (void) workspace;
    auto const batch = static_cast<int32_t>(inputDesc[0].dims.d[0]);
    auto const heads = static_cast<int32_t>(inputDesc[0].dims.d[1]);
    auto const length = static_cast<int32_t>(inputDesc[0].dims.d[2]);
    if (batch == 0 || heads == 0)
    {
        return 0; // empty output, nothing to do
    }
    int const status = cspkv_modality_topk_cuda(static_cast<float const*>(inputs[0]),
        static_cast<float const*>(inputs[1]), static_cast<int32_t const*>(inputs[2]),
        static_cast<int32_t const*>(inputs[3]), static_cast<int32_t const*>(inputs[4]), batch, heads, length,
        mCMax, mCrossRatio, static_cast<int64_t*>(outputs[0]), nullptr, stream);
    if (status != CSPKV_TOPK_OK)
    {
        logError(cspkv_topk_status_string(status));
    }
    return status;
}

IPluginV3* ModalityTopKPlugin::attachToContext(IPluginResourceContext* context) noexcept
{
    (void) context;
    return clone();
}

PluginFieldCollection const* ModalityTopKPlugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

// ---- ModalityTopKPluginCreator ------------------------------------------------------------------------

ModalityTopKPluginCreator::ModalityTopKPluginCreator()
{
    mFieldNames.emplace_back("cross_ratio", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back("c_max", nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFC.fields = mFieldNames.data();
}

char const* ModalityTopKPluginCreator::getPluginName() const noexcept
{
    return kModalityTopKName;
}

char const* ModalityTopKPluginCreator::getPluginVersion() const noexcept
{
    return kModalityTopKVersion;
}

char const* ModalityTopKPluginCreator::getPluginNamespace() const noexcept
{
    return kModalityTopKNamespace;
}

PluginFieldCollection const* ModalityTopKPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* ModalityTopKPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    (void) name;
    (void) phase; // kRUNTIME gets getFieldsToSerialize()'s fields: the same names, cross_ratio as float64
    if (fc == nullptr)
    {
        logError("ModalityTopK: no attributes given (cross_ratio and c_max are required)");
        return nullptr;
    }
    double crossRatio = std::numeric_limits<double>::quiet_NaN();
    double cMax = std::numeric_limits<double>::quiet_NaN();
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr)
        {
            continue;
        }
        double* target = nullptr;
        if (std::strcmp(field.name, "cross_ratio") == 0)
        {
            target = &crossRatio;
        }
        else if (std::strcmp(field.name, "c_max") == 0)
        {
            target = &cMax;
        }
        if (target != nullptr && !readScalar(field, *target))
        {
            logError("ModalityTopK: cross_ratio and c_max must be numeric scalars");
            return nullptr;
        }
    }
    if (!(crossRatio >= 0.0 && crossRatio <= 1.0))
    {
        logError("ModalityTopK: cross_ratio must be given, in [0, 1]");
        return nullptr;
    }
    if (!(cMax >= 1.0 && cMax <= static_cast<double>(std::numeric_limits<int32_t>::max())) || cMax != std::floor(cMax))
    {
        logError("ModalityTopK: c_max must be given, an integer >= 1");
        return nullptr;
    }
    try
    {
        return new ModalityTopKPlugin(crossRatio, static_cast<int32_t>(cMax));
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

} // namespace cspkv

// ---- library entry points -------------------------------------------------------------------------

namespace
{
cspkv::ModalityTopKPluginCreator& creatorInstance()
{
    static cspkv::ModalityTopKPluginCreator creator;
    return creator;
}
} // namespace

extern "C" void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static IPluginCreatorInterface* const creators[] = {&creatorInstance()};
    nbCreators = 1;
    return creators;
}

extern "C" bool cspkv_register_modality_topk_plugin()
{
    IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr)
    {
        return false;
    }
    if (registry->getCreator(cspkv::kModalityTopKName, cspkv::kModalityTopKVersion, cspkv::kModalityTopKNamespace)
        != nullptr)
    {
        return true;
    }
    return registry->registerCreator(creatorInstance(), cspkv::kModalityTopKNamespace);
}
