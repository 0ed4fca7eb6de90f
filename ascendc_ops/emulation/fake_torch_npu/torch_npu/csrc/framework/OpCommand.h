// TEST HARNESS: fake at_npu::native::OpCommand (see ../../../README.md): runs the custom handler at once.
#pragma once
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>
extern "C" const char* sparsedge_fake_opcommand_log();
namespace at_npu {
namespace native {
inline std::string& fake_opcommand_log() { static std::string s; return s; }
class OpCommand {
public:
    using PROC_FUNC = std::function<int()>;
    OpCommand& Name(const std::string& name) { name_ = name; return *this; }
    OpCommand& SetCustomHandler(PROC_FUNC func) { func_ = std::move(func); return *this; }
    void Run() {
        if (!func_) throw std::runtime_error("fake OpCommand: Run() without a custom handler");
        fake_opcommand_log() += name_ + "\n";
        int rc = func_();
        if (rc != 0) throw std::runtime_error("fake OpCommand: handler returned " + std::to_string(rc));
    }
private:
    std::string name_;
    PROC_FUNC func_;
};
}  // namespace native
}  // namespace at_npu
