/*
 * TensorRT IPluginV3 wrapper of CSP's modality-aware top-k kernel (modality_topk.cu); the semantics
 * are in modality_topk.h. Built only when TensorRT's NvInfer.h is found (CMakeLists.txt,
 * CSPKV_WITH_TENSORRT); needs TensorRT >= 10 (IPluginV3, DataType::kINT64).
 *
 * Plugin "ModalityTopK", version "1", namespace "cspkv". Attributes:
 *   cross_ratio  float32 (also accepted: float64, float16 bits are not): rho in [0, 1]. A float32
 *                value is read as the shortest decimal that rounds to it (0.9f -> 0.9, see
 *                cspkv_ratio_from_float32) so that floor(rho * K) matches the PyTorch policy, which
 *                computes it in double. Serialized as float64, so a built engine keeps that double.
 *   c_max        int32 (also accepted: int64, int16, int8): static output width, >= 1, <= L.
 *
 * Inputs (linear layout):
 *   0 self_scores   float32 [B, H, L]
 *   1 cross_scores  float32 [B, H, L]
 *   2 key_modality  int32   [B, L]     0 text, 1 image, -1 padding (padding last)
 *   3 n_keep        int32   [B]        C per batch row
 *   4 n_recent      int32   [B]        R per batch row, 0 <= R <= C <= n_valid
 * Output:
 *   0 indices       int64   [B, H, c_max]  kept positions ascending, then the others ascending
 *
 * Why int32 for the integer inputs: the kernel's loads and TensorRT's shape/int tensors are 32-bit
 * everywhere, and the values (ids in {-1, 0, 1}, budgets <= L) fit; the ONNX graph casts its int64
 * modality and budgets with Cast(to=INT32) before the node. The output stays int64 because the
 * exported graph's Gather / GatherElements consume the policy's int64 indices unchanged (TensorRT 10
 * supports kINT64 plugin outputs). Row data is not validated by the kernel: a bad row (C > n_valid,
 * R > C, ids out of range) is clamped, never read or written out of bounds.
 *
 * In an ONNX graph: a node of op_type "ModalityTopK" with attributes cross_ratio, c_max and
 * plugin_namespace = "cspkv" (the parser's plugin lookup uses it). Load the library with
 * trtexec --dynamicPlugins=libcspkv_modality_topk_plugin.so, IPluginRegistry::loadLibrary (both use
 * getCreators below), or link it and call cspkv_register_modality_topk_plugin().
 */
#ifndef CSPKV_MODALITY_TOPK_PLUGIN_H
#define CSPKV_MODALITY_TOPK_PLUGIN_H

#include <NvInfer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace cspkv
{

constexpr char const* kModalityTopKName = "ModalityTopK";
constexpr char const* kModalityTopKVersion = "1";
constexpr char const* kModalityTopKNamespace = "cspkv";

class ModalityTopKPlugin : public nvinfer1::IPluginV3,
                           public nvinfer1::IPluginV3OneCore,
                           public nvinfer1::IPluginV3OneBuild,
                           public nvinfer1::IPluginV3OneRuntime
{
public:
    ModalityTopKPlugin(double crossRatio, int32_t cMax);
    ModalityTopKPlugin(ModalityTopKPlugin const& other);
    ModalityTopKPlugin& operator=(ModalityTopKPlugin const&) = delete;
    ~ModalityTopKPlugin() override = default;

    double crossRatio() const noexcept { return mCrossRatio; }
    int32_t cMax() const noexcept { return mCMax; }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
        int32_t nbInputs, int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void initFieldsToSerialize();

    double mCrossRatio;
    int32_t mCMax;
    std::vector<nvinfer1::PluginField> mDataToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class ModalityTopKPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ModalityTopKPluginCreator();
    ~ModalityTopKPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace cspkv

extern "C"
{
    // Entry points that IPluginRegistry::loadLibrary and trtexec --dynamicPlugins look up.
    __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
    __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
        int32_t& nbCreators);
    // For applications that link the library: registers the creator in getPluginRegistry()
    // under namespace "cspkv"; returns true when it is registered (also when it already was).
    __attribute__((visibility("default"))) bool cspkv_register_modality_topk_plugin();
}

#endif // CSPKV_MODALITY_TOPK_PLUGIN_H
